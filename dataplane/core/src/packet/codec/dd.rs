//! The Dependency Descriptor RTP header extension (AV1 RTP specification,
//! appendix A), which tells a relay each frame's spatial and temporal
//! layer, its decode target indications and its dependencies, for AV1 and
//! also for VP8, VP9 and H.264 with scalable coding.
//!
//! Every descriptor carries the mandatory fields (start and end of frame,
//! a template id, a frame number). Descriptors longer than 3 bytes may also
//! carry the template dependency structure (usually on keyframes), a new
//! active decode targets bitmask and per-frame overrides of the template's
//! DTIs, frame differences and chain differences. Templates live in a
//! [`DdStructure`] the caller keeps per stream and passes to every
//! [`DependencyDescriptor::parse`]; it is replaced only when a packet
//! carries a structure that parses completely.
//!
//! Everything is held in fixed-capacity arrays sized by the specification's
//! bounds (64 templates, 32 decode targets, 32 chains, 4 spatial and 8
//! temporal layers; frame differences, which the specification does not
//! bound, are kept up to [`MAX_FDIFFS`] per frame), so parsing never
//! allocates.

use super::CodecError;
use super::bits::BitReader;

const WHAT: &str = "dependency descriptor";

/// The most templates a structure holds (template ids are 6 bits).
pub const MAX_TEMPLATES: usize = 64;
/// The most decode targets (DtCnt is 5 bits plus one).
pub const MAX_DECODE_TARGETS: usize = 32;
/// The most chains (at most one per decode target).
pub const MAX_CHAINS: usize = 32;
/// The most spatial layers.
pub const MAX_SPATIAL_LAYERS: usize = 4;
/// The most temporal layers.
pub const MAX_TEMPORAL_LAYERS: usize = 8;
/// The most frame differences kept per template or frame; more is
/// [`CodecError::TooLarge`].
pub const MAX_FDIFFS: usize = 16;

/// A decode target indication: what a frame means to one decode target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dti {
    /// 0: the frame is not part of the decode target.
    NotPresent,
    /// 1: the frame is part of it, but no frame of the target depends on
    /// it.
    Discardable,
    /// 2: a decoder can start decoding the target at this frame.
    Switch,
    /// 3: the frame is needed to decode the target.
    Required,
}

impl Dti {
    fn from_bits(v: u64) -> Dti {
        match v & 0x03 {
            0 => Dti::NotPresent,
            1 => Dti::Discardable,
            2 => Dti::Switch,
            _ => Dti::Required,
        }
    }
}

/// Two-bit DTIs of up to 32 decode targets, target 0 in the low bits.
fn dti_at(dtis: u64, dt: usize, count: u8) -> Dti {
    if dt >= usize::from(count) {
        return Dti::NotPresent;
    }
    Dti::from_bits(dtis >> (2 * dt))
}

fn read_dtis(r: &mut BitReader<'_>, count: u8) -> Result<u64, CodecError> {
    let mut dtis = 0u64;
    for dt in 0..count {
        dtis |= u64::from(r.read_bits(2)?) << (2 * dt);
    }
    Ok(dtis)
}

/// One frame dependency template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Template {
    spatial_id: u8,
    temporal_id: u8,
    dtis: u64,
    fdiff_count: u8,
    fdiffs: [u8; MAX_FDIFFS],
    chain_fdiffs: [u8; MAX_CHAINS],
}

impl Template {
    const EMPTY: Template = Template {
        spatial_id: 0,
        temporal_id: 0,
        dtis: 0,
        fdiff_count: 0,
        fdiffs: [0; MAX_FDIFFS],
        chain_fdiffs: [0; MAX_CHAINS],
    };
}

/// The template dependency structure of a stream, as last received.
#[derive(Clone, PartialEq, Eq)]
pub struct DdStructure {
    known: bool,
    template_id_offset: u8,
    template_count: u8,
    decode_target_count: u8,
    chain_count: u8,
    max_spatial_id: u8,
    max_temporal_id: u8,
    templates: [Template; MAX_TEMPLATES],
    protected_by: [u8; MAX_DECODE_TARGETS],
    target_layers: [(u8, u8); MAX_DECODE_TARGETS],
    resolutions: Option<[(u32, u32); MAX_SPATIAL_LAYERS]>,
    active_decode_targets: u32,
}

impl std::fmt::Debug for DdStructure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DdStructure")
            .field("known", &self.known)
            .field("template_id_offset", &self.template_id_offset)
            .field("templates", &self.template_count)
            .field("decode_targets", &self.decode_target_count)
            .field("chains", &self.chain_count)
            .field("spatial_layers", &self.spatial_layer_count())
            .field("temporal_layers", &self.temporal_layer_count())
            .field("active_decode_targets", &self.active_decode_targets)
            .finish()
    }
}

impl Default for DdStructure {
    fn default() -> Self {
        Self::new()
    }
}

impl DdStructure {
    /// No structure received yet: every descriptor is
    /// [`CodecError::NoStructure`] until one arrives.
    pub const fn new() -> Self {
        DdStructure {
            known: false,
            template_id_offset: 0,
            template_count: 0,
            decode_target_count: 0,
            chain_count: 0,
            max_spatial_id: 0,
            max_temporal_id: 0,
            templates: [Template::EMPTY; MAX_TEMPLATES],
            protected_by: [0; MAX_DECODE_TARGETS],
            target_layers: [(0, 0); MAX_DECODE_TARGETS],
            resolutions: None,
            active_decode_targets: 0,
        }
    }

    /// Whether a structure has been received.
    pub fn is_known(&self) -> bool {
        self.known
    }

    /// The template id of the structure's first template.
    pub fn template_id_offset(&self) -> u8 {
        self.template_id_offset
    }

    /// Number of templates.
    pub fn template_count(&self) -> usize {
        usize::from(self.template_count)
    }

    /// Number of decode targets (0 before a structure is known).
    pub fn decode_target_count(&self) -> usize {
        usize::from(self.decode_target_count)
    }

    /// Number of spatial layers the templates use (0 before a structure is
    /// known).
    pub fn spatial_layer_count(&self) -> usize {
        if self.known {
            usize::from(self.max_spatial_id) + 1
        } else {
            0
        }
    }

    /// Number of temporal layers the templates use (0 before a structure is
    /// known).
    pub fn temporal_layer_count(&self) -> usize {
        if self.known {
            usize::from(self.max_temporal_id) + 1
        } else {
            0
        }
    }

    /// Number of chains.
    pub fn chain_count(&self) -> usize {
        usize::from(self.chain_count)
    }

    /// The highest spatial and temporal id among the frames of decode
    /// target `dt`.
    pub fn decode_target_layers(&self, dt: usize) -> Option<(u8, u8)> {
        self.target_layers
            .get(..self.decode_target_count())?
            .get(dt)
            .copied()
    }

    /// The chain that protects decode target `dt`, when there are chains.
    pub fn decode_target_protected_by(&self, dt: usize) -> Option<u8> {
        if self.chain_count == 0 {
            return None;
        }
        self.protected_by
            .get(..self.decode_target_count())?
            .get(dt)
            .copied()
    }

    /// Render width and height of spatial layer `sid`, when the structure
    /// carries resolutions.
    pub fn render_resolution(&self, sid: usize) -> Option<(u32, u32)> {
        self.resolutions?
            .get(..self.spatial_layer_count())?
            .get(sid)
            .copied()
    }

    /// The latest active decode targets bitmask (decode target 0 in bit 0):
    /// all targets when a structure arrives, then as packets update it.
    pub fn active_decode_targets(&self) -> u32 {
        self.active_decode_targets
    }

    /// Whether decode target `dt` is active.
    pub fn is_decode_target_active(&self, dt: usize) -> bool {
        dt < self.decode_target_count() && self.active_decode_targets >> dt & 1 == 1
    }

    fn all_targets(&self) -> u32 {
        ((1u64 << self.decode_target_count) - 1) as u32
    }

    /// template_dependency_structure() (A.2.2).
    fn read(r: &mut BitReader<'_>) -> Result<DdStructure, CodecError> {
        let mut s = DdStructure::new();
        s.known = true;
        s.template_id_offset = r.read_bits(6)? as u8;
        s.decode_target_count = r.read_bits(5)? as u8 + 1;
        let dt_count = s.decode_target_count;

        // template_layers()
        let (mut sid, mut tid) = (0u8, 0u8);
        loop {
            let t = s.templates.get_mut(usize::from(s.template_count)).ok_or(
                CodecError::Malformed {
                    what: "dependency descriptor structure with more than 64 templates",
                },
            )?;
            t.spatial_id = sid;
            t.temporal_id = tid;
            s.template_count += 1;
            match r.read_bits(2)? {
                0 => {}
                1 => {
                    tid += 1;
                    if usize::from(tid) >= MAX_TEMPORAL_LAYERS {
                        return Err(CodecError::Malformed {
                            what: "dependency descriptor structure with more than 8 temporal layers",
                        });
                    }
                    s.max_temporal_id = s.max_temporal_id.max(tid);
                }
                2 => {
                    tid = 0;
                    sid += 1;
                    if usize::from(sid) >= MAX_SPATIAL_LAYERS {
                        return Err(CodecError::Malformed {
                            what: "dependency descriptor structure with more than 4 spatial layers",
                        });
                    }
                }
                _ => break,
            }
        }
        s.max_spatial_id = sid;
        let count = usize::from(s.template_count);
        let templates = s.templates.get_mut(..count).unwrap_or_default();

        // template_dtis()
        for t in templates.iter_mut() {
            t.dtis = read_dtis(r, dt_count)?;
        }
        // template_fdiffs()
        for t in templates.iter_mut() {
            while r.read_bit()? {
                let slot =
                    t.fdiffs
                        .get_mut(usize::from(t.fdiff_count))
                        .ok_or(CodecError::TooLarge {
                            what: "dependency descriptor template frame differences",
                        })?;
                *slot = r.read_bits(4)? as u8 + 1;
                t.fdiff_count += 1;
            }
        }
        // template_chains()
        s.chain_count = r.ns(u32::from(dt_count) + 1)? as u8;
        if s.chain_count != 0 {
            for p in s.protected_by.iter_mut().take(usize::from(dt_count)) {
                *p = r.ns(u32::from(s.chain_count))? as u8;
            }
            for t in templates.iter_mut() {
                for c in t.chain_fdiffs.iter_mut().take(usize::from(s.chain_count)) {
                    *c = r.read_bits(4)? as u8;
                }
            }
        }
        // decode_target_layers()
        for (dt, layers) in s
            .target_layers
            .iter_mut()
            .enumerate()
            .take(usize::from(dt_count))
        {
            *layers = templates
                .iter()
                .filter(|t| dti_at(t.dtis, dt, dt_count) != Dti::NotPresent)
                .fold((0, 0), |(s, t), tpl| {
                    (s.max(tpl.spatial_id), t.max(tpl.temporal_id))
                });
        }
        // render_resolutions()
        if r.read_bit()? {
            let mut res = [(0u32, 0u32); MAX_SPATIAL_LAYERS];
            for slot in res.iter_mut().take(usize::from(sid) + 1) {
                let w = r.read_bits(16)? + 1;
                let h = r.read_bits(16)? + 1;
                *slot = (w, h);
            }
            s.resolutions = Some(res);
        }
        s.active_decode_targets = s.all_targets();
        Ok(s)
    }
}

/// One parsed dependency descriptor: the frame's place in the structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DependencyDescriptor {
    /// The packet is the first of the frame.
    pub start_of_frame: bool,
    /// The packet is the last of the frame.
    pub end_of_frame: bool,
    /// frame_dependency_template_id (6 bits).
    pub template_id: u8,
    /// frame_number (16 bits, wrapping).
    pub frame_number: u16,
    /// Spatial id of the frame (from its template).
    pub spatial_id: u8,
    /// Temporal id of the frame (from its template).
    pub temporal_id: u8,
    /// The packet carried a template dependency structure (which replaced
    /// the caller's).
    pub structure_attached: bool,
    /// The active decode targets bitmask, when the packet set it (or
    /// reset it to all targets by attaching a structure).
    pub active_decode_targets: Option<u32>,
    decode_target_count: u8,
    dtis: u64,
    fdiff_count: u8,
    fdiffs: [u16; MAX_FDIFFS],
    chain_count: u8,
    chain_fdiffs: [u8; MAX_CHAINS],
    resolution: Option<(u32, u32)>,
}

impl DependencyDescriptor {
    /// Parses the extension's data (`data` is the element's value, its
    /// length the `sz` of the specification). A packet that carries a
    /// structure replaces `structure` once the whole descriptor has parsed;
    /// one that sets the active decode targets updates it. On error,
    /// `structure` is unchanged.
    pub fn parse(
        data: &[u8],
        structure: &mut DdStructure,
    ) -> Result<DependencyDescriptor, CodecError> {
        let mut r = BitReader::new(data, WHAT);
        let start_of_frame = r.read_bit()?;
        let end_of_frame = r.read_bit()?;
        let template_id = r.read_bits(6)? as u8;
        let frame_number = r.read_bits(16)? as u16;
        let mut flags = [false; 5];
        if data.len() > 3 {
            for f in &mut flags {
                *f = r.read_bit()?;
            }
        }
        let [
            structure_present,
            adt_present,
            custom_dtis,
            custom_fdiffs,
            custom_chains,
        ] = flags;

        let fresh = if structure_present {
            Some(DdStructure::read(&mut r)?)
        } else {
            None
        };
        let s: &DdStructure = match &fresh {
            Some(fresh) => fresh,
            None if structure.known => structure,
            None => return Err(CodecError::NoStructure),
        };
        let mut active_decode_targets = structure_present.then(|| s.all_targets());
        if adt_present {
            active_decode_targets = Some(r.read_bits(u32::from(s.decode_target_count))?);
        }

        // frame_dependency_definition()
        let index = (usize::from(template_id) + MAX_TEMPLATES - usize::from(s.template_id_offset))
            % MAX_TEMPLATES;
        let t = s
            .templates
            .get(..s.template_count())
            .unwrap_or_default()
            .get(index)
            .ok_or(CodecError::Malformed {
                what: "dependency descriptor template id outside the structure",
            })?;
        let mut d = DependencyDescriptor {
            start_of_frame,
            end_of_frame,
            template_id,
            frame_number,
            spatial_id: t.spatial_id,
            temporal_id: t.temporal_id,
            structure_attached: structure_present,
            active_decode_targets,
            decode_target_count: s.decode_target_count,
            dtis: t.dtis,
            fdiff_count: t.fdiff_count,
            fdiffs: [0; MAX_FDIFFS],
            chain_count: s.chain_count,
            chain_fdiffs: t.chain_fdiffs,
            resolution: s.render_resolution(usize::from(t.spatial_id)),
        };
        for (dst, &src) in d.fdiffs.iter_mut().zip(&t.fdiffs) {
            *dst = u16::from(src);
        }
        if custom_dtis {
            d.dtis = read_dtis(&mut r, s.decode_target_count)?;
        }
        if custom_fdiffs {
            d.fdiff_count = 0;
            loop {
                let size = r.read_bits(2)?;
                if size == 0 {
                    break;
                }
                let slot =
                    d.fdiffs
                        .get_mut(usize::from(d.fdiff_count))
                        .ok_or(CodecError::TooLarge {
                            what: "dependency descriptor frame differences",
                        })?;
                *slot = r.read_bits(4 * size)? as u16 + 1;
                d.fdiff_count += 1;
            }
        }
        if custom_chains {
            for c in d.chain_fdiffs.iter_mut().take(usize::from(s.chain_count)) {
                *c = r.read_bits(8)? as u8;
            }
        }
        // The rest is zero padding.

        if let Some(fresh) = fresh {
            *structure = fresh;
        }
        if let Some(adt) = active_decode_targets {
            structure.active_decode_targets = adt;
        }
        Ok(d)
    }

    /// Number of decode targets of the structure the frame belongs to.
    pub fn decode_target_count(&self) -> usize {
        usize::from(self.decode_target_count)
    }

    /// The frame's indication for decode target `dt`;
    /// [`Dti::NotPresent`] past the last target.
    pub fn dti(&self, dt: usize) -> Dti {
        dti_at(self.dtis, dt, self.decode_target_count)
    }

    /// Whether a decoder can switch to decode target `dt` at this frame
    /// (its DTI is [`Dti::Switch`]).
    pub fn is_switch_point(&self, dt: usize) -> bool {
        self.dti(dt) == Dti::Switch
    }

    /// The frame differences: frame numbers `frame_number - fdiff` are the
    /// frames this one references.
    pub fn fdiffs(&self) -> &[u16] {
        self.fdiffs
            .get(..usize::from(self.fdiff_count))
            .unwrap_or_default()
    }

    /// The chain differences, one per chain.
    pub fn chain_fdiffs(&self) -> &[u8] {
        self.chain_fdiffs
            .get(..usize::from(self.chain_count))
            .unwrap_or_default()
    }

    /// Render resolution of the frame's spatial layer, when the structure
    /// carries resolutions.
    pub fn resolution(&self) -> Option<(u32, u32)> {
        self.resolution
    }
}

/// A test-only writer of dependency descriptors, shared with the
/// random-input seeds.
#[cfg(test)]
pub(crate) mod writer {
    /// Bits, MSB first.
    #[derive(Default)]
    pub struct BitWriter {
        pub bytes: Vec<u8>,
        bits: usize,
    }

    impl BitWriter {
        pub fn put(&mut self, v: u32, n: u32) {
            for i in (0..n).rev() {
                if self.bits.is_multiple_of(8) {
                    self.bytes.push(0);
                }
                let bit = ((v >> i) & 1) as u8;
                *self.bytes.last_mut().expect("pushed") |= bit << (7 - self.bits % 8);
                self.bits += 1;
            }
        }

        pub fn ns(&mut self, v: u32, n: u32) {
            let w = 32 - n.leading_zeros();
            let m = (1 << w) - n;
            if v < m {
                self.put(v, w - 1);
            } else {
                self.put(m + ((v - m) >> 1), w - 1);
                self.put((v - m) & 1, 1);
            }
        }
    }

    /// One template: spatial id, temporal id, DTIs as "-DSR" letters,
    /// frame differences, chain differences.
    pub struct T(
        pub u8,
        pub u8,
        pub &'static str,
        pub &'static [u8],
        pub &'static [u8],
    );

    /// template_dependency_structure().
    pub fn structure(
        w: &mut BitWriter,
        offset: u32,
        templates: &[T],
        protected_by: &[u32],
        resolutions: Option<&[(u32, u32)]>,
    ) {
        let dt_count = templates[0].2.len() as u32;
        let chains = templates[0].4.len() as u32;
        w.put(offset, 6);
        w.put(dt_count - 1, 5);
        for pair in templates.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let idc = if (b.0, b.1) == (a.0, a.1) {
                0
            } else if b.0 == a.0 && b.1 == a.1 + 1 {
                1
            } else {
                assert_eq!((b.0, b.1), (a.0 + 1, 0), "templates out of order");
                2
            };
            w.put(idc, 2);
        }
        w.put(3, 2);
        for t in templates {
            for c in t.2.chars() {
                w.put("-DSR".find(c).expect("DTI letter") as u32, 2);
            }
        }
        for t in templates {
            for &f in t.3 {
                w.put(1, 1);
                w.put(u32::from(f) - 1, 4);
            }
            w.put(0, 1);
        }
        w.ns(chains, dt_count + 1);
        if chains > 0 {
            for &p in protected_by {
                w.ns(p, chains);
            }
            for t in templates {
                for &c in t.4 {
                    w.put(u32::from(c), 4);
                }
            }
        }
        match resolutions {
            Some(res) => {
                w.put(1, 1);
                for &(width, height) in res {
                    w.put(width - 1, 16);
                    w.put(height - 1, 16);
                }
            }
            None => w.put(0, 1),
        }
    }

    /// The L1T3 structure libwebrtc uses (three decode targets, one chain).
    pub const L1T3: [T; 5] = [
        T(0, 0, "SSS", &[], &[0]),
        T(0, 0, "SSS", &[4], &[4]),
        T(0, 1, "-DS", &[2], &[2]),
        T(0, 2, "--D", &[1], &[1]),
        T(0, 2, "--D", &[1], &[3]),
    ];

    /// A keyframe descriptor with the L1T3 structure attached (template
    /// id offset `offset`, frame number 0x1234).
    pub fn l1t3_keyframe(offset: u32) -> Vec<u8> {
        let mut w = BitWriter::default();
        w.put(1, 1); // start of frame
        w.put(1, 1); // end of frame
        w.put(offset, 6);
        w.put(0x1234, 16);
        w.put(0b10000, 5); // structure present, nothing else
        structure(&mut w, offset, &L1T3, &[0, 0, 0], Some(&[(640, 360)]));
        w.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::writer::*;
    use super::*;

    fn mandatory(sof: bool, eof: bool, template_id: u8, frame_number: u16) -> [u8; 3] {
        let [hi, lo] = frame_number.to_be_bytes();
        [
            u8::from(sof) << 7 | u8::from(eof) << 6 | template_id,
            hi,
            lo,
        ]
    }

    #[test]
    fn l1t3_structure_then_mandatory_descriptors() {
        let key = l1t3_keyframe(0);
        let mut s = DdStructure::new();
        assert!(!s.is_known());
        assert_eq!((s.spatial_layer_count(), s.decode_target_count()), (0, 0));
        let d = DependencyDescriptor::parse(&key, &mut s).unwrap();
        assert!(d.start_of_frame && d.end_of_frame && d.structure_attached);
        assert_eq!((d.template_id, d.frame_number), (0, 0x1234));
        assert_eq!((d.spatial_id, d.temporal_id), (0, 0));
        assert_eq!(d.active_decode_targets, Some(0b111));
        assert_eq!(d.decode_target_count(), 3);
        assert!((0..3).all(|dt| d.is_switch_point(dt)));
        assert_eq!(d.dti(3), Dti::NotPresent);
        assert!(d.fdiffs().is_empty());
        assert_eq!(d.chain_fdiffs(), &[0]);
        assert_eq!(d.resolution(), Some((640, 360)));

        assert!(s.is_known());
        assert_eq!(s.template_count(), 5);
        assert_eq!(s.template_id_offset(), 0);
        assert_eq!((s.spatial_layer_count(), s.temporal_layer_count()), (1, 3));
        assert_eq!((s.decode_target_count(), s.chain_count()), (3, 1));
        assert_eq!(s.decode_target_layers(0), Some((0, 0)));
        assert_eq!(s.decode_target_layers(1), Some((0, 1)));
        assert_eq!(s.decode_target_layers(2), Some((0, 2)));
        assert_eq!(s.decode_target_layers(3), None);
        assert_eq!(s.decode_target_protected_by(2), Some(0));
        assert_eq!(s.render_resolution(0), Some((640, 360)));
        assert_eq!(s.render_resolution(1), None);
        assert_eq!(s.active_decode_targets(), 0b111);
        assert!(s.is_decode_target_active(2) && !s.is_decode_target_active(3));
        assert!(format!("{s:?}").contains("templates: 5"));

        // Later frames send the 3 mandatory bytes only.
        let d = DependencyDescriptor::parse(&mandatory(true, false, 2, 0x1236), &mut s).unwrap();
        assert_eq!(
            (d.spatial_id, d.temporal_id, d.frame_number),
            (0, 1, 0x1236)
        );
        assert!(!d.structure_attached && d.active_decode_targets.is_none());
        assert_eq!(
            [d.dti(0), d.dti(1), d.dti(2)],
            [Dti::NotPresent, Dti::Discardable, Dti::Switch]
        );
        assert!(!d.is_switch_point(1) && d.is_switch_point(2));
        assert_eq!((d.fdiffs(), d.chain_fdiffs()), (&[2u16][..], &[2u8][..]));
        let d = DependencyDescriptor::parse(&mandatory(false, true, 4, 7), &mut s).unwrap();
        assert_eq!(d.temporal_id, 2);
        assert_eq!(d.dti(2), Dti::Discardable);
        assert_eq!(d.chain_fdiffs(), &[3]);
        // A template id past the structure.
        assert_eq!(
            DependencyDescriptor::parse(&mandatory(true, true, 5, 8), &mut s),
            Err(CodecError::Malformed {
                what: "dependency descriptor template id outside the structure"
            })
        );
    }

    #[test]
    fn template_ids_wrap_around_the_offset() {
        let mut s = DdStructure::new();
        DependencyDescriptor::parse(&l1t3_keyframe(62), &mut s).unwrap();
        assert_eq!(s.template_id_offset(), 62);
        let tids: Vec<u8> = [62, 63, 0, 1, 2]
            .iter()
            .map(|&id| {
                DependencyDescriptor::parse(&mandatory(true, true, id, 1), &mut s)
                    .unwrap()
                    .temporal_id
            })
            .collect();
        assert_eq!(tids, [0, 0, 1, 2, 2]);
        assert!(DependencyDescriptor::parse(&mandatory(true, true, 3, 1), &mut s).is_err());
        assert!(DependencyDescriptor::parse(&mandatory(true, true, 61, 1), &mut s).is_err());
    }

    #[test]
    fn no_structure_and_failed_parses_leave_it_unchanged() {
        let mut s = DdStructure::new();
        assert_eq!(
            DependencyDescriptor::parse(&mandatory(true, true, 0, 1), &mut s),
            Err(CodecError::NoStructure)
        );
        // Extended fields without a structure.
        assert_eq!(
            DependencyDescriptor::parse(&[0xc0, 0, 1, 0x40], &mut s),
            Err(CodecError::NoStructure)
        );
        let key = l1t3_keyframe(0);
        for cut in 0..key.len() {
            let mut s = DdStructure::new();
            let want = if cut == 3 {
                CodecError::NoStructure
            } else {
                CodecError::Truncated { what: WHAT }
            };
            assert_eq!(
                DependencyDescriptor::parse(&key[..cut], &mut s),
                Err(want),
                "cut {cut}"
            );
            assert_eq!(s, DdStructure::new(), "cut {cut}");
        }
        // With a structure known, a cut-off new one leaves the old one.
        let mut s = DdStructure::new();
        DependencyDescriptor::parse(&key, &mut s).unwrap();
        let before = s.clone();
        let other = l1t3_keyframe(9);
        for cut in 4..other.len() {
            assert!(
                DependencyDescriptor::parse(&other[..cut], &mut s).is_err(),
                "cut {cut}"
            );
            assert_eq!(s, before);
        }
        // Trailing zero padding is accepted.
        let mut padded = other.clone();
        padded.extend_from_slice(&[0, 0]);
        DependencyDescriptor::parse(&padded, &mut s).unwrap();
        assert_eq!(s.template_id_offset(), 9);
    }

    #[test]
    fn custom_fields_and_active_decode_targets() {
        let mut s = DdStructure::new();
        DependencyDescriptor::parse(&l1t3_keyframe(0), &mut s).unwrap();
        let mut w = BitWriter::default();
        w.put(0b10, 2);
        w.put(3, 6); // template 3: T2
        w.put(99, 16);
        w.put(0b01111, 5); // active decode targets, custom DTIs, fdiffs, chains
        w.put(0b011, 3); // decode targets 0 and 1 active
        for dti in [3, 0, 2] {
            w.put(dti, 2);
        }
        for (size, fdiff) in [(1, 1u32), (2, 200), (3, 4000)] {
            w.put(size, 2);
            w.put(fdiff - 1, 4 * size);
        }
        w.put(0, 2);
        w.put(17, 8); // chain 0
        let d = DependencyDescriptor::parse(&w.bytes, &mut s).unwrap();
        assert_eq!((d.temporal_id, d.frame_number), (2, 99));
        assert_eq!(d.active_decode_targets, Some(0b011));
        assert_eq!(s.active_decode_targets(), 0b011);
        assert!(!s.is_decode_target_active(2));
        assert_eq!(
            [d.dti(0), d.dti(1), d.dti(2)],
            [Dti::Required, Dti::NotPresent, Dti::Switch]
        );
        assert_eq!(d.fdiffs(), &[1, 200, 4000]);
        assert_eq!(d.chain_fdiffs(), &[17]);
        // A new structure resets the bitmask to all targets.
        DependencyDescriptor::parse(&l1t3_keyframe(0), &mut s).unwrap();
        assert_eq!(s.active_decode_targets(), 0b111);
        // Every cut of the custom descriptor is an error.
        for cut in 0..w.bytes.len() {
            assert!(DependencyDescriptor::parse(&w.bytes[..cut], &mut s).is_err() || cut == 3);
        }
    }

    #[test]
    fn two_spatial_layers_with_resolutions() {
        // L2T2 (full SVC): 4 decode targets, 2 chains.
        let templates = [
            T(0, 0, "SSSS", &[], &[0, 0]),
            T(0, 0, "SSRR", &[2], &[2, 1]),
            T(0, 1, "-D-R", &[1], &[1, 2]),
            T(1, 0, "--SS", &[1], &[1, 1]),
            T(1, 0, "--SS", &[2, 1], &[1, 1]),
            T(1, 1, "---D", &[1, 2], &[2, 1]),
        ];
        let mut w = BitWriter::default();
        w.put(0b10_000011, 8); // template 3
        w.put(5, 16);
        w.put(0b10000, 5);
        structure(
            &mut w,
            0,
            &templates,
            &[0, 0, 1, 1],
            Some(&[(320, 180), (65536, 720)]),
        );
        let mut s = DdStructure::new();
        let d = DependencyDescriptor::parse(&w.bytes, &mut s).unwrap();
        assert_eq!((d.spatial_id, d.temporal_id), (1, 0));
        assert_eq!(d.resolution(), Some((65536, 720)));
        assert_eq!(d.fdiffs(), &[1]);
        assert_eq!(d.chain_fdiffs(), &[1, 1]);
        assert_eq!((s.spatial_layer_count(), s.temporal_layer_count()), (2, 2));
        assert_eq!((s.decode_target_count(), s.chain_count()), (4, 2));
        assert_eq!(s.decode_target_layers(3), Some((1, 1)));
        assert_eq!(s.decode_target_layers(2), Some((1, 0)));
        assert_eq!(s.decode_target_protected_by(1), Some(0));
        assert_eq!(s.decode_target_protected_by(3), Some(1));
        assert_eq!(s.render_resolution(0), Some((320, 180)));
        let d = DependencyDescriptor::parse(&mandatory(false, true, 4, 6), &mut s).unwrap();
        assert_eq!(d.fdiffs(), &[2, 1]);
        assert_eq!(d.resolution(), Some((65536, 720)));
    }

    #[test]
    fn capacity_limits() {
        let head = |w: &mut BitWriter| {
            w.put(0xc0, 8);
            w.put(0, 16);
            w.put(0b10000, 5);
            w.put(0, 6); // offset
            w.put(0, 5); // one decode target
        };
        // 65 templates.
        let mut w = BitWriter::default();
        head(&mut w);
        for _ in 0..64 {
            w.put(0, 2);
        }
        w.put(3, 2);
        w.bytes.resize(w.bytes.len() + 64, 0);
        assert!(matches!(
            DependencyDescriptor::parse(&w.bytes, &mut DdStructure::new()),
            Err(CodecError::Malformed { .. })
        ));
        // 64 templates is fine.
        let mut w = BitWriter::default();
        head(&mut w);
        for _ in 0..63 {
            w.put(0, 2);
        }
        w.put(3, 2);
        w.bytes.resize(w.bytes.len() + 64, 0);
        let mut s = DdStructure::new();
        DependencyDescriptor::parse(&w.bytes, &mut s).unwrap();
        assert_eq!(s.template_count(), 64);
        assert_eq!(s.chain_count(), 0);
        assert_eq!(s.decode_target_protected_by(0), None);
        // 5 spatial layers, 9 temporal layers.
        for (idc, n) in [(2u32, 4), (1, 8)] {
            let mut w = BitWriter::default();
            head(&mut w);
            for _ in 0..n {
                w.put(idc, 2);
            }
            w.put(3, 2);
            w.bytes.resize(w.bytes.len() + 16, 0);
            assert!(matches!(
                DependencyDescriptor::parse(&w.bytes, &mut DdStructure::new()),
                Err(CodecError::Malformed { .. })
            ));
        }
        // 17 frame differences on a template.
        let mut w = BitWriter::default();
        head(&mut w);
        w.put(3, 2); // one template
        w.put(0, 2); // its DTI
        for _ in 0..17 {
            w.put(0b1_0000, 5);
        }
        w.put(0, 1);
        w.bytes.resize(w.bytes.len() + 4, 0);
        assert!(matches!(
            DependencyDescriptor::parse(&w.bytes, &mut DdStructure::new()),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
