/*
 * ridge.js: browser client for a Ridge edge node (see docs/api.md).
 *
 * Plain JavaScript, no dependencies, modern Chromium. Everything hangs off
 * `window.Ridge`. Functions meant to be driven from automated tests (through
 * CDP `Runtime.evaluate` with `awaitPromise`/`returnByValue`) resolve with
 * plain JSON-serialisable values; live objects (peer connections, streams,
 * rooms) stay in registries on `window` and are referred to by id.
 */
(function () {
  'use strict';

  const SIMULCAST_ENCODINGS = [
    { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150000 },
    { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500000 },
    { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1500000 },
  ];
  const ICE_GATHER_TIMEOUT_MS = 2000;
  const WS_REQUEST_TIMEOUT_MS = 15000;
  const PING_INTERVAL_MS = 5000;
  const PONG_TIMEOUT_MS = 15000;

  // Registries of live objects. `window.__ridge` is the single root.
  const registry = (window.__ridge = window.__ridge || {
    sessions: {}, // id -> {id, kind:'whip'|'whep', pc, location, url, token, stream}
    streams: {}, // MediaStream.id -> MediaStream
    rooms: {}, // room id -> Room
  });
  let nextId = 1;
  const newId = (prefix) => `${prefix}-${nextId++}`;

  // ---------------------------------------------------------------- helpers

  function defaultBase() {
    const o = window.location && window.location.origin;
    return o && o !== 'null' ? o : 'http://localhost';
  }

  function normBase(base) {
    return String(base || defaultBase()).replace(/\/+$/, '');
  }

  function sleep(ms) {
    return new Promise((r) => setTimeout(r, ms));
  }

  /** Decode a JWT payload without verifying it (for display/defaults only). */
  function decodeToken(token) {
    try {
      const part = String(token || '').split('.')[1];
      if (!part) return null;
      let b64 = part.replace(/-/g, '+').replace(/_/g, '/');
      while (b64.length % 4) b64 += '=';
      const bin = atob(b64);
      const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch (_) {
      return null;
    }
  }

  /** Resolves once ICE gathering is complete, or after `ms`. */
  function waitIceGathering(pc, ms = ICE_GATHER_TIMEOUT_MS) {
    if (pc.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener('icegatheringstatechange', check);
        pc.removeEventListener('icecandidate', onCand);
        resolve();
      };
      const check = () => {
        if (pc.iceGatheringState === 'complete') done();
      };
      const onCand = (e) => {
        if (!e.candidate) done();
      };
      const timer = setTimeout(done, ms);
      pc.addEventListener('icegatheringstatechange', check);
      pc.addEventListener('icecandidate', onCand);
    });
  }

  async function createOfferGathered(pc) {
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    await waitIceGathering(pc);
    return pc.localDescription.sdp;
  }

  async function readError(resp) {
    let text = '';
    try {
      text = await resp.text();
    } catch (_) {
      /* ignore */
    }
    let msg = text.trim();
    try {
      const body = JSON.parse(text);
      if (body && body.error) msg = String(body.error);
    } catch (_) {
      /* not JSON: keep short plain text, drop HTML pages */
      if (msg.startsWith('<')) msg = '';
      if (msg.length > 300) msg = msg.slice(0, 300) + '…';
    }
    return msg || resp.statusText || 'request failed';
  }

  function httpError(prefix, status, message) {
    const err = new Error(`${prefix} ${status}: ${message}`);
    err.status = status;
    return err;
  }

  /** Applies a codec preference ("VP8", "H264", "video/VP9", ...) to a video transceiver. */
  function preferCodec(transceiver, codec) {
    if (!codec || typeof transceiver.setCodecPreferences !== 'function') return;
    const want = String(codec).toLowerCase().replace(/^video\//, '');
    const caps =
      (window.RTCRtpReceiver.getCapabilities && RTCRtpReceiver.getCapabilities('video')) ||
      (window.RTCRtpSender.getCapabilities && RTCRtpSender.getCapabilities('video'));
    if (!caps) return;
    const sub = (c) => c.mimeType.toLowerCase().replace(/^video\//, '');
    const preferred = caps.codecs.filter((c) => sub(c) === want);
    if (!preferred.length) throw new Error(`video codec ${codec} is not supported by this browser`);
    const helpers = caps.codecs.filter((c) => ['rtx', 'red', 'ulpfec', 'flexfec-03'].includes(sub(c)));
    transceiver.setCodecPreferences(preferred.concat(helpers));
  }

  /** Adds the tracks of `stream` as sendonly transceivers. */
  function addSendTracks(pc, stream, { simulcast = false, videoCodec, scalabilityMode } = {}) {
    const transceivers = [];
    for (const track of stream.getTracks()) {
      const init = { direction: 'sendonly', streams: [stream] };
      if (track.kind === 'video' && simulcast) {
        init.sendEncodings = SIMULCAST_ENCODINGS.map((e) => Object.assign({}, e));
      } else if (track.kind === 'video' && scalabilityMode) {
        // One SVC encoding ("L3T3", "L1T3", ...): VP9 and AV1.
        init.sendEncodings = [{ scalabilityMode }];
      }
      const t = pc.addTransceiver(track, init);
      if (track.kind === 'video') preferCodec(t, videoCodec);
      transceivers.push(t);
    }
    return transceivers;
  }

  /** Accepts a MediaStream, a registered stream id, or nothing (last stream / new fake stream). */
  async function resolveStream(stream) {
    if (stream && typeof stream === 'object' && typeof stream.getTracks === 'function') return stream;
    if (typeof stream === 'string') {
      const s = registry.streams[stream];
      if (!s) throw new Error(`unknown stream ${stream}`);
      return s;
    }
    if (Ridge.lastStream) return Ridge.lastStream;
    return fakeStream({});
  }

  function resolveElement(el) {
    if (!el) return null;
    if (typeof el === 'string') return document.querySelector(el);
    return el;
  }

  function attachStream(el, stream, { muted = false } = {}) {
    el = resolveElement(el);
    if (!el) return;
    el.autoplay = true;
    el.playsInline = true;
    el.muted = muted;
    if (el.srcObject !== stream) el.srcObject = stream;
    const p = el.play && el.play();
    if (p && p.catch) p.catch(() => {});
  }

  function num(v) {
    return typeof v === 'number' && isFinite(v) ? v : 0;
  }

  /** Summarises an RTCStatsReport as plain JSON. */
  function summariseStats(report) {
    const video = { framesDecoded: 0, frameWidth: 0, frameHeight: 0, packetsReceived: 0, packetsLost: 0, bytesReceived: 0, codec: null };
    // The codec of an RTP stream: its codec stats' MIME type ("video/H264").
    const codecOf = (s) => {
      const c = s.codecId && report.get(s.codecId);
      return (c && c.mimeType) || null;
    };
    const audio = { packetsReceived: 0, totalSamplesReceived: 0, audioLevel: 0, bytesReceived: 0 };
    const outbound = [];
    let bestFrames = -1;
    report.forEach((s) => {
      const kind = s.kind || s.mediaType;
      if (s.type === 'inbound-rtp' && kind === 'video') {
        video.framesDecoded += num(s.framesDecoded);
        video.packetsReceived += num(s.packetsReceived);
        video.packetsLost += num(s.packetsLost);
        video.bytesReceived += num(s.bytesReceived);
        if (num(s.framesDecoded) > bestFrames) {
          bestFrames = num(s.framesDecoded);
          video.frameWidth = num(s.frameWidth);
          video.frameHeight = num(s.frameHeight);
          video.codec = codecOf(s);
        }
      } else if (s.type === 'inbound-rtp' && kind === 'audio') {
        audio.packetsReceived += num(s.packetsReceived);
        audio.totalSamplesReceived += num(s.totalSamplesReceived);
        audio.bytesReceived += num(s.bytesReceived);
        audio.audioLevel = Math.max(audio.audioLevel, num(s.audioLevel));
      } else if (s.type === 'outbound-rtp') {
        outbound.push({
          kind: kind || null,
          rid: s.rid || null,
          frameWidth: num(s.frameWidth),
          frameHeight: num(s.frameHeight),
          framesEncoded: num(s.framesEncoded),
          bytesSent: num(s.bytesSent),
          packetsSent: num(s.packetsSent),
          active: s.active !== false,
          codec: codecOf(s),
        });
      }
    });
    const order = { q: 0, h: 1, f: 2 };
    outbound.sort((a, b) => {
      if (a.kind !== b.kind) return a.kind === 'audio' ? -1 : 1;
      return (order[a.rid] ?? 9) - (order[b.rid] ?? 9);
    });
    return { video, audio, outbound };
  }

  // ---------------------------------------------------------------- media

  /**
   * getUserMedia with the given constraints (tests run Chromium with a fake
   * camera and microphone). Returns the MediaStream (not serialisable: use
   * `Ridge.streamInfo()` or `.then(s => s.id)` from tests).
   */
  async function fakeStream({ width = 1280, height = 720, audio = true, video = true, frameRate = 30 } = {}) {
    const constraints = {
      audio: !!audio,
      video: video
        ? { width: { ideal: width }, height: { ideal: height }, frameRate: { ideal: frameRate } }
        : false,
    };
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
    registry.streams[stream.id] = stream;
    Ridge.lastStream = stream;
    return stream;
  }

  /** Plain-JSON description of a stream (default: the last one). */
  function streamInfo(stream) {
    const s = typeof stream === 'string' ? registry.streams[stream] : stream || Ridge.lastStream;
    if (!s) return null;
    return {
      id: s.id,
      active: s.active,
      tracks: s.getTracks().map((t) => {
        const st = t.getSettings ? t.getSettings() : {};
        return {
          id: t.id,
          kind: t.kind,
          label: t.label,
          readyState: t.readyState,
          muted: t.muted,
          enabled: t.enabled,
          width: st.width || null,
          height: st.height || null,
        };
      }),
    };
  }

  // ---------------------------------------------------------------- WHIP / WHEP

  async function postOffer(prefix, url, token, sdp) {
    let resp;
    try {
      resp = await fetch(url, {
        method: 'POST',
        headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/sdp' },
        body: sdp,
      });
    } catch (e) {
      throw httpError(prefix, 0, e && e.message ? e.message : String(e));
    }
    if (!resp.ok) throw httpError(prefix, resp.status, await readError(resp));
    const location = resp.headers.get('Location');
    const answer = await resp.text();
    if (!location) throw httpError(prefix, resp.status, 'response has no Location header');
    return { location, answer };
  }

  function registerSession(kind, pc, fields) {
    const id = newId(kind);
    const session = Object.assign({ id, kind, pc, createdAt: Date.now() }, fields);
    registry.sessions[id] = session;
    return session;
  }

  function getSession(id) {
    const s = registry.sessions[id];
    if (!s) throw new Error(`unknown session ${id}`);
    return s;
  }

  /**
   * Publishes a stream with WHIP (no trickle).
   * @returns Promise<{id, location}>
   */
  async function whipPublish({ base, room = 'demo', token, stream, simulcast = false, videoCodec, scalabilityMode } = {}) {
    base = normBase(base);
    stream = await resolveStream(stream);
    const pc = new RTCPeerConnection({ iceServers: [] });
    try {
      addSendTracks(pc, stream, { simulcast, videoCodec, scalabilityMode });
      const sdp = await createOfferGathered(pc);
      const url = `${base}/whip/${encodeURIComponent(room)}`;
      const { location, answer } = await postOffer('WHIP', url, token, sdp);
      await pc.setRemoteDescription({ type: 'answer', sdp: answer });
      const s = registerSession('whip', pc, {
        location,
        url: new URL(location, base + '/').href,
        token,
        room,
        stream,
        simulcast,
      });
      return { id: s.id, location };
    } catch (e) {
      pc.close();
      throw e;
    }
  }

  /**
   * Subscribes with WHEP: `audio` recvonly audio m-lines and `video` recvonly video m-lines.
   * @returns Promise<{id, location}>
   */
  async function whepSubscribe({ base, room = 'demo', token, audio = 1, video = 1, videoElement, videoCodec } = {}) {
    base = normBase(base);
    const pc = new RTCPeerConnection({ iceServers: [] });
    const stream = new MediaStream();
    try {
      for (let i = 0; i < Number(audio || 0); i++) {
        const t = pc.addTransceiver('audio', { direction: 'recvonly' });
        stream.addTrack(t.receiver.track);
      }
      for (let i = 0; i < Number(video || 0); i++) {
        const t = pc.addTransceiver('video', { direction: 'recvonly' });
        preferCodec(t, videoCodec);
        stream.addTrack(t.receiver.track);
      }
      const sdp = await createOfferGathered(pc);
      const url = `${base}/whep/${encodeURIComponent(room)}`;
      const { location, answer } = await postOffer('WHEP', url, token, sdp);
      await pc.setRemoteDescription({ type: 'answer', sdp: answer });
      const s = registerSession('whep', pc, {
        location,
        url: new URL(location, base + '/').href,
        token,
        room,
        stream,
      });
      registry.streams[stream.id] = stream;
      if (videoElement) attachStream(videoElement, stream, { muted: false });
      return { id: s.id, location };
    } catch (e) {
      pc.close();
      throw e;
    }
  }

  /** DELETEs the session's Location and closes its peer connection. Resolves {id, status}. */
  async function stop(id) {
    const s = getSession(id);
    let status = 0;
    try {
      const resp = await fetch(s.url, { method: 'DELETE', headers: { Authorization: `Bearer ${s.token}` } });
      status = resp.status;
    } catch (_) {
      status = 0;
    } finally {
      try {
        s.pc.close();
      } catch (_) {
        /* ignore */
      }
      delete registry.sessions[id];
    }
    return { id, status };
  }

  /** Pins the simulcast layer of a WHEP session (`null` = automatic). Resolves {id, rid, status}. */
  async function setLayer(id, rid) {
    const s = getSession(id);
    rid = rid === undefined ? null : rid;
    let resp;
    try {
      resp = await fetch(`${s.url}/layer`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${s.token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ rid }),
      });
    } catch (e) {
      throw httpError('layer', 0, e && e.message ? e.message : String(e));
    }
    if (!resp.ok) throw httpError('layer', resp.status, await readError(resp));
    s.layer = rid;
    return { id, rid, status: resp.status };
  }

  /**
   * Pins the scalable layers (VP9 SVC, VP8 temporal layers) a WHEP session
   * receives: `{spatial, temporal}`, each `null` for every layer.
   */
  async function setSvcLayers(id, { spatial = null, temporal = null } = {}) {
    const s = getSession(id);
    let resp;
    try {
      resp = await fetch(`${s.url}/layer`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${s.token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ spatial, temporal }),
      });
    } catch (e) {
      throw httpError('layer', 0, e && e.message ? e.message : String(e));
    }
    if (!resp.ok) throw httpError('layer', resp.status, await readError(resp));
    return { id, spatial, temporal, status: resp.status };
  }

  /** Stats of a WHIP/WHEP session as plain JSON. */
  async function stats(id) {
    const s = getSession(id);
    const out = summariseStats(await s.pc.getStats());
    out.connectionState = s.pc.connectionState;
    out.iceConnectionState = s.pc.iceConnectionState;
    return out;
  }

  /** Plain-JSON list of live WHIP/WHEP sessions. */
  function sessions() {
    return Object.values(registry.sessions).map((s) => ({
      id: s.id,
      kind: s.kind,
      room: s.room,
      location: s.location,
      connectionState: s.pc.connectionState,
    }));
  }

  /**
   * Polls `fn` (sync or async) until it returns a truthy value; resolves that value.
   * Rejects after `timeout` ms.
   */
  async function waitFor(fn, { timeout = 10000, interval = 100 } = {}) {
    const end = Date.now() + timeout;
    let last;
    for (;;) {
      try {
        last = await fn();
        if (last) return last;
      } catch (e) {
        last = e;
      }
      if (Date.now() > end) {
        throw new Error(`waitFor timed out${last instanceof Error ? ': ' + last.message : ''}`);
      }
      await sleep(interval);
    }
  }

  // ---------------------------------------------------------------- WebSocket rooms

  class Emitter {
    constructor() {
      this._handlers = new Map();
    }
    on(type, fn) {
      if (!this._handlers.has(type)) this._handlers.set(type, new Set());
      this._handlers.get(type).add(fn);
      return this;
    }
    off(type, fn) {
      const h = this._handlers.get(type);
      if (h) h.delete(fn);
      return this;
    }
    once(type, fn) {
      const wrap = (...a) => {
        this.off(type, wrap);
        fn(...a);
      };
      return this.on(type, wrap);
    }
    emit(type, ev) {
      for (const key of [type, '*']) {
        const h = this._handlers.get(key);
        if (!h) continue;
        for (const fn of Array.from(h)) {
          try {
            fn(ev, type);
          } catch (e) {
            console.error('ridge: handler for', type, 'failed:', e);
          }
        }
      }
    }
  }

  /**
   * A participant in a WebSocket room.
   *
   * Server events are emitted under their `type` (`welcome`, `participant_joined`,
   * `chat`, `layers`, `shutdown`, `error`, ...); `'*'` receives all of them. Local
   * events: `state` ({state, attempt?, reason?}), `stream` ({participant, identity,
   * stream}), `stream_removed` ({participant}), `published` ({peer}),
   * `subscribed` ({participant, peer}), `layers_applied` ({peer, active}),
   * `resumed` / `reset` (after a reconnect, whether the session survived).
   */
  class Room extends Emitter {
    constructor({ base, room = 'demo', token, autoSubscribe = true, maxReconnectAttempts = 30 } = {}) {
      super();
      this.id = newId('room');
      this.base = normBase(base);
      this.room = room;
      this.token = token;
      this.autoSubscribe = autoSubscribe;
      this.maxReconnectAttempts = maxReconnectAttempts;

      this.state = 'new'; // new | connecting | open | reconnecting | closed | failed
      this.participant = null;
      this.identity = null;
      this.resumeToken = null;
      this.lastSeq = 0;
      this.events = [];
      this.participants = new Map(); // participant -> {participant, identity}
      this.tracks = new Map(); // track -> {track, participant, kind, rids}
      this.activeSpeaker = null;
      this.draining = false;

      this._pubs = new Map(); // peer -> {peer, pc, stream, opts, layers}
      this._subs = new Map(); // participant -> {participant, peer, pc, trackIds, pending}
      this._streams = new Map(); // participant -> MediaStream
      this._pendingLayers = new Map(); // peer -> layers event received before the answer
      this._ws = null;
      this._left = false;
      this._everOpened = false;
      this._attempt = 0;
      this._reqChain = Promise.resolve();
      this._pending = null; // {type, resolve, reject, timer}
      this._syncTimer = null;
      this._pingTimer = null;
      this._reconnectTimer = null;
      this._lastRx = 0;
      this._joinWaiter = null;

      registry.rooms[this.id] = this;
      Ridge.lastRoom = this;
    }

    // ------------------------------------------------------------ connection

    _wsUrl(resume) {
      const u = new URL(`${this.base}/v1/rooms/${encodeURIComponent(this.room)}/ws`);
      u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
      u.searchParams.set('token', this.token || '');
      if (resume && this.resumeToken) {
        u.searchParams.set('resume', this.resumeToken);
        u.searchParams.set('last_seq', String(this.lastSeq));
      }
      return u.href;
    }

    _setState(state, extra) {
      this.state = state;
      this.emit('state', Object.assign({ state }, extra || {}));
    }

    /** Connects and resolves with the `welcome` message. */
    join() {
      if (this._joinPromise) return this._joinPromise;
      this._left = false;
      this._joinPromise = new Promise((resolve, reject) => {
        this._joinWaiter = { resolve, reject };
      });
      this._connect(false);
      this._joinPromise.catch(() => {
        this._joinPromise = null;
      });
      return this._joinPromise;
    }

    _connect(resume) {
      this._setState(resume ? 'reconnecting' : 'connecting', resume ? { attempt: this._attempt } : undefined);
      let ws;
      try {
        ws = new WebSocket(this._wsUrl(resume));
      } catch (e) {
        this._failJoin(new Error(`WS 0: ${e.message}`));
        return;
      }
      this._ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this._lastRx = Date.now();
        this._startPing();
      };
      ws.onmessage = (e) => {
        if (ws !== this._ws) return;
        this._lastRx = Date.now();
        let msg;
        try {
          msg = JSON.parse(e.data);
        } catch (_) {
          console.warn('ridge: non-JSON message', e.data);
          return;
        }
        this._onMessage(msg);
      };
      ws.onerror = () => {
        /* onclose follows */
      };
      ws.onclose = (e) => {
        if (ws !== this._ws) return;
        this._ws = null;
        this._stopPing();
        this._rejectPending(new Error('WebSocket closed'));
        if (this._left) {
          this._setState('closed');
          return;
        }
        if (!this._everOpened) {
          // The first connection never produced a welcome: find out why.
          this._probe().then((err) =>
            this._failJoin(err || new Error(`WS ${e.code}: connection failed${e.reason ? ' (' + e.reason + ')' : ''}`)),
          );
          return;
        }
        this._scheduleReconnect(opened ? null : e);
      };
    }

    /** After a failed upgrade, a plain GET tells the HTTP status (401, 403, 503...). */
    async _probe() {
      try {
        const u = new URL(`${this.base}/v1/rooms/${encodeURIComponent(this.room)}/ws`);
        u.searchParams.set('token', this.token || '');
        const resp = await fetch(u.href, { headers: { Authorization: `Bearer ${this.token || ''}` } });
        if (resp.status === 401 || resp.status === 403 || resp.status === 404 || resp.status >= 500) {
          return httpError('WS', resp.status, await readError(resp));
        }
      } catch (_) {
        /* unreachable node */
      }
      return null;
    }

    _failJoin(err) {
      this._setState('failed', { reason: err.message });
      if (this._joinWaiter) {
        this._joinWaiter.reject(err);
        this._joinWaiter = null;
      }
    }

    _scheduleReconnect() {
      if (this._left || this._reconnectTimer) return;
      if (this._attempt >= this.maxReconnectAttempts) {
        this._setState('failed', { reason: 'too many reconnect attempts' });
        return;
      }
      const delay = Math.min(10000, 500 * 2 ** this._attempt) * (0.8 + Math.random() * 0.4);
      this._attempt++;
      this._setState('reconnecting', { attempt: this._attempt, delay: Math.round(delay) });
      this._reconnectTimer = setTimeout(async () => {
        this._reconnectTimer = null;
        if (this._left) return;
        if (this._attempt > 2) {
          // Stop early when the token can no longer work.
          const err = await this._probe();
          if (err && (err.status === 401 || err.status === 403)) {
            this._setState('failed', { reason: err.message });
            return;
          }
        }
        this._connect(true);
      }, delay);
    }

    _startPing() {
      this._stopPing();
      this._pingTimer = setInterval(() => {
        if (!this._ws || this._ws.readyState !== WebSocket.OPEN) return;
        if (Date.now() - this._lastRx > PONG_TIMEOUT_MS) {
          // Half-open connection: drop it and resume on a new one.
          try {
            this._ws.close(4000, 'heartbeat timeout');
          } catch (_) {
            /* ignore */
          }
          const ws = this._ws;
          if (ws && ws.onclose) ws.onclose({ code: 4000, reason: 'heartbeat timeout' });
          return;
        }
        this._sendRaw({ type: 'ping' });
      }, PING_INTERVAL_MS);
    }

    _stopPing() {
      if (this._pingTimer) clearInterval(this._pingTimer);
      this._pingTimer = null;
    }

    _sendRaw(msg) {
      if (!this._ws || this._ws.readyState !== WebSocket.OPEN) return false;
      this._ws.send(JSON.stringify(msg));
      return true;
    }

    /** Sends a raw client message; throws when not connected. */
    sendMessage(msg) {
      if (!this._sendRaw(msg)) throw new Error(`not connected (state ${this.state})`);
    }

    // ------------------------------------------------------------ messages

    _onMessage(msg) {
      const type = msg.type;
      if (type !== 'welcome' && typeof msg.seq === 'number') {
        if (msg.seq <= this.lastSeq) return; // duplicate from a replay
        this.lastSeq = msg.seq;
      }
      this.events.push(msg);
      if (this.events.length > 5000) this.events.splice(0, this.events.length - 5000);

      switch (type) {
        case 'welcome':
          this._onWelcome(msg);
          break;
        case 'answer':
          this._resolvePending(msg);
          break;
        case 'error':
          if (this._pending && (!msg.request || msg.request === this._pending.type)) {
            this._rejectPending(new Error(`${msg.request || 'request'} failed: ${msg.message}`));
          }
          break;
        case 'participant_joined':
          this.participants.set(msg.participant, { participant: msg.participant, identity: msg.identity });
          break;
        case 'participant_left':
          this.participants.delete(msg.participant);
          for (const [t, info] of this.tracks) if (info.participant === msg.participant) this.tracks.delete(t);
          this._dropSubscription(msg.participant, false);
          if (this.activeSpeaker === msg.participant) this.activeSpeaker = null;
          break;
        case 'track_published':
          this.tracks.set(msg.track, {
            track: msg.track,
            participant: msg.participant,
            kind: msg.kind,
            rids: msg.rids || [],
            codec: msg.codec || null,
          });
          this._scheduleSync();
          break;
        case 'track_unpublished':
          this.tracks.delete(msg.track);
          this._scheduleSync();
          break;
        case 'active_speaker':
          this.activeSpeaker = msg.participant || null;
          break;
        case 'layers':
          this._onLayers(msg);
          break;
        case 'shutdown':
          this.draining = true;
          break;
        default:
          break;
      }
      this.emit(type, msg);
    }

    _onWelcome(msg) {
      const reconnect = this._everOpened;
      const fresh = !this.participant || msg.participant !== this.participant;
      this._everOpened = true;
      this._attempt = 0;
      this.participant = msg.participant;
      this.identity = msg.identity;
      this.resumeToken = msg.resume || null;
      this.draining = false;
      if (fresh) this.lastSeq = typeof msg.seq === 'number' ? msg.seq : 0;

      this.participants = new Map();
      for (const p of msg.participants || []) this.participants.set(p.participant, { participant: p.participant, identity: p.identity });
      this.tracks = new Map();
      for (const t of msg.tracks || []) {
        this.tracks.set(t.track, { track: t.track, participant: t.participant, kind: t.kind, rids: t.rids || [] });
      }
      this._setState('open', { participant: this.participant, resumed: reconnect && !fresh });

      if (this._joinWaiter) {
        this._joinWaiter.resolve(msg);
        this._joinWaiter = null;
      }
      if (reconnect && fresh) {
        // The old session is gone: its peer connections are dead on the server.
        this._resetMedia();
        this.emit('reset', { participant: this.participant });
      } else if (reconnect) {
        this.emit('resumed', { participant: this.participant, lastSeq: this.lastSeq });
      }
      this._scheduleSync(0);
    }

    async _resetMedia() {
      const pubs = Array.from(this._pubs.values());
      for (const p of pubs) p.pc.close();
      this._pubs.clear();
      for (const participant of Array.from(this._subs.keys())) this._dropSubscription(participant, false);
      for (const p of pubs) {
        try {
          await this.publish(p.stream, p.opts);
        } catch (e) {
          console.warn('ridge: republish failed:', e.message);
        }
      }
    }

    // ------------------------------------------------------------ request/answer

    /** Sends an offer-carrying message and resolves with the `answer`. Serialised. */
    _request(msg) {
      const run = () =>
        new Promise((resolve, reject) => {
          if (!this._ws || this._ws.readyState !== WebSocket.OPEN) {
            reject(new Error(`not connected (state ${this.state})`));
            return;
          }
          const timer = setTimeout(() => this._rejectPending(new Error(`${msg.type}: no answer`)), WS_REQUEST_TIMEOUT_MS);
          this._pending = { type: msg.type, resolve, reject, timer };
          this._sendRaw(msg);
        });
      const p = this._reqChain.then(run, run);
      this._reqChain = p.catch(() => {});
      return p;
    }

    _resolvePending(msg) {
      const p = this._pending;
      if (!p) return;
      this._pending = null;
      clearTimeout(p.timer);
      p.resolve(msg);
    }

    _rejectPending(err) {
      const p = this._pending;
      if (!p) return;
      this._pending = null;
      clearTimeout(p.timer);
      p.reject(err);
    }

    // ------------------------------------------------------------ publishing

    /**
     * Publishes a stream (MediaStream, registered stream id, or nothing = Ridge.lastStream).
     * Resolves {peer}.
     */
    async publish(stream, opts = {}) {
      const { simulcast = false, videoCodec, scalabilityMode } = opts || {};
      stream = await resolveStream(stream);
      const pc = new RTCPeerConnection({ iceServers: [] });
      try {
        addSendTracks(pc, stream, { simulcast, videoCodec, scalabilityMode });
        const sdp = await createOfferGathered(pc);
        const answer = await this._request({ type: 'publish', sdp });
        await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
        const pub = { peer: answer.peer, pc, stream, opts: { simulcast, videoCodec, scalabilityMode }, layers: null };
        this._pubs.set(answer.peer, pub);
        const pending = this._pendingLayers.get(answer.peer);
        if (pending) {
          this._pendingLayers.delete(answer.peer);
          this._applyLayers(pub, pending.active);
        }
        this.emit('published', { peer: answer.peer });
        return { peer: answer.peer };
      } catch (e) {
        pc.close();
        throw e;
      }
    }

    /** Stops one publication (or all when `peer` is omitted). */
    unpublish(peer) {
      const peers = peer ? [peer] : Array.from(this._pubs.keys());
      for (const p of peers) {
        const pub = this._pubs.get(p);
        if (!pub) continue;
        this._sendRaw({ type: 'unpublish', peer: p });
        pub.pc.close();
        this._pubs.delete(p);
      }
      return { peers };
    }

    _onLayers(msg) {
      let pub = this._pubs.get(msg.peer);
      if (!pub) {
        if (this._pending && this._pending.type === 'publish') {
          this._pendingLayers.set(msg.peer, msg);
          return;
        }
        // Unknown peer id: fall back to the only simulcast publication, if any.
        const sim = Array.from(this._pubs.values()).filter((p) => p.opts.simulcast);
        if (sim.length !== 1) {
          this._pendingLayers.set(msg.peer, msg);
          return;
        }
        pub = sim[0];
      }
      this._applyLayers(pub, msg.active);
    }

    async _applyLayers(pub, active) {
      const want = new Set(active || []);
      for (const sender of pub.pc.getSenders()) {
        if (!sender.track || sender.track.kind !== 'video') continue;
        const params = sender.getParameters();
        if (!params.encodings || params.encodings.length < 2) continue;
        let any = false;
        for (const enc of params.encodings) {
          enc.active = enc.rid ? want.has(enc.rid) : true;
          any = any || enc.active;
        }
        if (!any) params.encodings[0].active = true; // keep the lowest layer warm
        try {
          await sender.setParameters(params);
        } catch (e) {
          console.warn('ridge: setParameters failed:', e.message);
        }
        pub.layers = params.encodings.filter((e) => e.active).map((e) => e.rid);
      }
      this.emit('layers_applied', { peer: pub.peer, active: pub.layers });
    }

    // ------------------------------------------------------------ subscribing

    _scheduleSync(delay = 150) {
      if (this._syncTimer) clearTimeout(this._syncTimer);
      this._syncTimer = setTimeout(() => {
        this._syncTimer = null;
        this._syncSubscriptions();
      }, delay);
    }

    _tracksOf(participant) {
      return Array.from(this.tracks.values()).filter((t) => t.participant === participant);
    }

    _syncSubscriptions() {
      if (this._left || this.state !== 'open') return;
      const publishers = new Set();
      for (const t of this.tracks.values()) if (t.participant !== this.participant) publishers.add(t.participant);
      // Drop subscriptions whose participant has no track any more.
      for (const participant of Array.from(this._subs.keys())) {
        if (!publishers.has(participant) && !this._subs.get(participant).pending) this._dropSubscription(participant, true);
      }
      if (!this.autoSubscribe) return;
      for (const participant of publishers) {
        const sub = this._subs.get(participant);
        if (sub && sub.pending) continue;
        const tracks = this._tracksOf(participant);
        const missing = !sub || tracks.some((t) => !sub.trackIds.includes(t.track));
        if (missing) {
          this.subscribe(participant).catch((e) => console.warn(`ridge: subscribe to ${participant} failed:`, e.message));
        }
      }
    }

    /**
     * Subscribes to every track of one participant (replacing an older subscription
     * to it). Resolves {participant, peer}.
     */
    async subscribe(participant) {
      const tracks = this._tracksOf(participant);
      if (!tracks.length) throw new Error(`${participant} publishes no track`);
      const old = this._subs.get(participant);
      const pending = { participant, pending: true, trackIds: tracks.map((t) => t.track) };
      this._subs.set(participant, Object.assign({}, old || {}, pending));
      const pc = new RTCPeerConnection({ iceServers: [] });
      const newTracks = [];
      try {
        for (const t of tracks) {
          const tr = pc.addTransceiver(t.kind === 'audio' ? 'audio' : 'video', { direction: 'recvonly' });
          newTracks.push(tr.receiver.track);
        }
        const sdp = await createOfferGathered(pc);
        const answer = await this._request({ type: 'subscribe', participant, sdp });
        await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
        // Make before break: the old subscription goes once the new one is answered.
        if (old && old.pc) {
          this._sendRaw({ type: 'unsubscribe', peer: old.peer });
          old.pc.close();
        }
        if (!this.participants.has(participant) && !this._tracksOf(participant).length) {
          // Left while we were negotiating.
          this._sendRaw({ type: 'unsubscribe', peer: answer.peer });
          pc.close();
          this._subs.delete(participant);
          return { participant, peer: null };
        }
        this._subs.set(participant, { participant, peer: answer.peer, pc, trackIds: pending.trackIds, pending: false });
        let stream = this._streams.get(participant);
        if (!stream) {
          stream = new MediaStream();
          this._streams.set(participant, stream);
          registry.streams[stream.id] = stream;
        }
        for (const t of stream.getTracks()) stream.removeTrack(t);
        for (const t of newTracks) stream.addTrack(t);
        const info = this.participants.get(participant);
        this.emit('subscribed', { participant, peer: answer.peer });
        this.emit('stream', { participant, identity: info ? info.identity : null, stream });
        // Tracks may have changed while we negotiated.
        this._scheduleSync();
        return { participant, peer: answer.peer };
      } catch (e) {
        pc.close();
        const cur = this._subs.get(participant);
        if (cur && cur.pending) {
          if (old && old.pc) this._subs.set(participant, old);
          else this._subs.delete(participant);
        }
        throw e;
      }
    }

    /** Ends the subscription to one participant. */
    unsubscribe(participant) {
      this._dropSubscription(participant, true);
      return { participant };
    }

    _dropSubscription(participant, notify) {
      const sub = this._subs.get(participant);
      if (sub) {
        if (notify && sub.peer) this._sendRaw({ type: 'unsubscribe', peer: sub.peer });
        if (sub.pc) sub.pc.close();
        this._subs.delete(participant);
      }
      const stream = this._streams.get(participant);
      if (stream) {
        this._streams.delete(participant);
        delete registry.streams[stream.id];
        this.emit('stream_removed', { participant });
      }
    }

    /** Pins the simulcast layer of the subscription to `participant` (null = automatic). */
    setLayer(participant, rid) {
      const sub = this._subs.get(participant);
      if (!sub || !sub.peer) throw new Error(`not subscribed to ${participant}`);
      this.sendMessage({ type: 'layer', peer: sub.peer, rid: rid === undefined ? null : rid });
      return { participant, peer: sub.peer, rid: rid === undefined ? null : rid };
    }

    /**
     * Pins the scalable layers (VP9 SVC, VP8 temporal layers) of the
     * subscription to `participant`: `{spatial, temporal}`, each null for
     * every layer.
     */
    setSvcLayers(participant, { spatial = null, temporal = null } = {}) {
      const sub = this._subs.get(participant);
      if (!sub || !sub.peer) throw new Error(`not subscribed to ${participant}`);
      this.sendMessage({ type: 'svc_layers', peer: sub.peer, spatial, temporal });
      return { participant, peer: sub.peer, spatial, temporal };
    }

    // ------------------------------------------------------------ messaging

    chat(text) {
      this.sendMessage({ type: 'chat', text: String(text) });
      return true;
    }

    send(payload) {
      this.sendMessage({ type: 'data', payload });
      return true;
    }

    /** Leaves the room and closes every peer connection. Resolves true. */
    async leave() {
      if (this._left) return true;
      this._left = true;
      if (this._reconnectTimer) clearTimeout(this._reconnectTimer);
      if (this._syncTimer) clearTimeout(this._syncTimer);
      this._reconnectTimer = this._syncTimer = null;
      this._stopPing();
      this._rejectPending(new Error('left the room'));
      const ws = this._ws;
      this._sendRaw({ type: 'leave' });
      for (const p of this._pubs.values()) p.pc.close();
      this._pubs.clear();
      for (const participant of Array.from(this._subs.keys())) this._dropSubscription(participant, false);
      if (ws) {
        await new Promise((resolve) => {
          const t = setTimeout(resolve, 1000);
          ws.addEventListener('close', () => {
            clearTimeout(t);
            resolve();
          });
        });
        try {
          ws.close(1000, 'leave');
        } catch (_) {
          /* ignore */
        }
      }
      this._ws = null;
      this._joinPromise = null;
      this._everOpened = false;
      this.participant = null;
      this.resumeToken = null;
      this._setState('closed');
      return true;
    }

    // ------------------------------------------------------------ introspection

    /** {participant: MediaStream} of every remote participant received (live objects). */
    remoteStreams() {
      const out = {};
      for (const [p, s] of this._streams) out[p] = s;
      return out;
    }

    /** Plain-JSON view of the remote streams: {participant: [{kind, id, readyState, muted}]}. */
    remoteTracks() {
      const out = {};
      for (const [p, s] of this._streams) {
        out[p] = s.getTracks().map((t) => ({ kind: t.kind, id: t.id, readyState: t.readyState, muted: t.muted }));
      }
      return out;
    }

    /** {participant: {videoFramesDecoded, audioPackets, frameWidth, frameHeight, ...}} of the subscriptions. */
    async stats() {
      const out = {};
      for (const [participant, sub] of this._subs) {
        if (!sub.pc || sub.pending) continue;
        const s = summariseStats(await sub.pc.getStats());
        const info = this.participants.get(participant);
        out[participant] = {
          identity: info ? info.identity : null,
          peer: sub.peer,
          videoFramesDecoded: s.video.framesDecoded,
          audioPackets: s.audio.packetsReceived,
          frameWidth: s.video.frameWidth,
          frameHeight: s.video.frameHeight,
          videoCodec: s.video.codec,
          videoPackets: s.video.packetsReceived,
          videoBytes: s.video.bytesReceived,
          audioBytes: s.audio.bytesReceived,
          audioLevel: s.audio.audioLevel,
          connectionState: sub.pc.connectionState,
        };
      }
      return out;
    }

    /** [{peer, connectionState, layers, outbound:[{kind, rid, frameWidth, frameHeight, bytesSent, packetsSent, active}]}] */
    async publishStats() {
      const out = [];
      for (const pub of this._pubs.values()) {
        const s = summariseStats(await pub.pc.getStats());
        out.push({ peer: pub.peer, connectionState: pub.pc.connectionState, layers: pub.layers, outbound: s.outbound });
      }
      return out;
    }

    /** Plain-JSON snapshot of the room state. */
    info() {
      const subs = {};
      for (const [p, s] of this._subs) {
        subs[p] = { peer: s.peer || null, pending: !!s.pending, tracks: s.trackIds, connectionState: s.pc ? s.pc.connectionState : null };
      }
      return {
        id: this.id,
        room: this.room,
        state: this.state,
        participant: this.participant,
        identity: this.identity,
        lastSeq: this.lastSeq,
        draining: this.draining,
        activeSpeaker: this.activeSpeaker,
        participants: Array.from(this.participants.values()),
        tracks: Array.from(this.tracks.values()),
        subscriptions: subs,
        publications: Array.from(this._pubs.values()).map((p) => ({
          peer: p.peer,
          connectionState: p.pc.connectionState,
          simulcast: !!p.opts.simulcast,
          layers: p.layers,
        })),
        events: this.events.length,
      };
    }

    /** Test hook: drops the WebSocket without leaving, to exercise resume. */
    dropConnection() {
      if (this._ws) this._ws.close(4001, 'dropped by client');
      return true;
    }
  }

  const Ridge = {
    version: '1',
    whipPublish,
    whepSubscribe,
    stop,
    setLayer,
    setSvcLayers,
    stats,
    sessions,
    fakeStream,
    getMedia: fakeStream,
    streamInfo,
    decodeToken,
    waitFor,
    Room,
    registry,
    lastStream: null,
    lastRoom: null,
    get rooms() {
      return registry.rooms;
    },
    room(id) {
      return id ? registry.rooms[id] : Ridge.lastRoom;
    },
    session(id) {
      return registry.sessions[id];
    },
  };
  window.Ridge = Ridge;
})();
