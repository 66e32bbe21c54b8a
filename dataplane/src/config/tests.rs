//! Tests of the node configuration: building, precedence, validation and
//! the limits.
use super::*;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

const SECRET: &str = "0123456789abcdef-test-secret";

fn env() -> Option<String> {
    Some(SECRET.to_owned())
}

fn ok(toml: &str) -> Config {
    from_toml_str(toml, &Overrides::default(), env()).expect("valid config")
}

fn err(toml: &str, overrides: &Overrides) -> (&'static str, String) {
    match from_toml_str(toml, overrides, env()) {
        Err(ConfigError::Invalid { field, message }) => (field, message),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn limits_default_below_max_sessions_and_parse() {
    let c = from_toml_str("max_sessions = 100\n", &Overrides::default(), env()).unwrap();
    let l = &c.limits;
    assert_eq!(l.per_identity.sessions, 25);
    assert_eq!(l.per_identity.tracks, 50);
    assert_eq!(l.per_identity.rtp_endpoints, 25);
    assert_eq!(l.per_identity.rooms, DEFAULT_IDENTITY_MAX_ROOMS);
    assert_eq!(l.per_token, l.per_identity);
    assert_eq!(l.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    assert_eq!(l.rtp_consent_timeout, DEFAULT_RTP_CONSENT_TIMEOUT);
    assert!(l.rtp_allow_networks.is_empty() && l.rtp_trusted_networks.is_empty());
    assert!(
        c.warnings()
            .iter()
            .all(|w| !w.contains("identity_max_sessions"))
    );

    let c = from_toml_str(
        "max_sessions = 10\nidentity_max_sessions = 10\ntoken_max_sessions = 2\n\
         handshake_timeout = \"5s\"\nrtp_allow_networks = [\"127.0.0.0/8\"]\n\
         rtp_trusted_networks = [\"10.0.0.0/8\", \"fd00::/8\"]\n",
        &Overrides::default(),
        env(),
    )
    .unwrap();
    assert_eq!(c.limits.per_identity.sessions, 10);
    assert_eq!(c.limits.per_token.sessions, 2);
    assert_eq!(c.limits.handshake_timeout, Duration::from_secs(5));
    assert_eq!(c.limits.rtp_allow_networks[0].to_string(), "127.0.0.0/8");
    assert_eq!(c.limits.rtp_trusted_networks.len(), 2);
    assert!(
        c.warnings()
            .iter()
            .any(|w| w.contains("identity_max_sessions"))
    );

    let (field, msg) = err(
        "rtp_trusted_networks = [\"10.0.0.0/33\"]\n",
        &Overrides::default(),
    );
    assert_eq!(field, "rtp_trusted_networks");
    assert!(msg.contains("CIDR"), "{msg}");
    let (field, _) = err("token_max_rooms = 0\n", &Overrides::default());
    assert_eq!(field, "token_max_rooms");
    let (field, _) = err("handshake_timeout = \"10m\"\n", &Overrides::default());
    assert_eq!(field, "handshake_timeout");
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, process-unique scratch directory.
fn scratch() -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ridge-config-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// Structurally valid PEM (the DER inside is not checked by PEM parsing).
const CERT_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydA==\n-----END CERTIFICATE-----\n";
const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH\n-----END PRIVATE KEY-----\n";

fn tls_files(cert: &str, key: &str) -> (PathBuf, PathBuf) {
    let dir = scratch();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    // Secret files must be private; the tests also pass the
    // certificate where a key is expected.
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&c, std::fs::Permissions::from_mode(0o600)).unwrap();
    (c, k)
}

#[test]
fn defaults() {
    let c = ok("");
    assert_eq!(c.http, DEFAULT_HTTP);
    assert_eq!(c.http.to_string(), "127.0.0.1:8080");
    assert_eq!(c.udp.to_string(), "127.0.0.1:5004");
    assert_eq!(c.public_ip, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    assert_eq!(c.jwt_secret.as_ref().unwrap().expose(), SECRET);
    assert!(c.tls.is_none());
    assert!(!c.insecure_http);
    assert!(!c.dev_no_auth);
    assert_eq!(c.drain_timeout, Duration::from_secs(10));
    assert_eq!(c.max_sessions, 1000);
    assert_eq!(c.pli_interval, Duration::from_millis(500));
    assert_eq!(c.log, "info");
    assert!(c.warnings().is_empty());
}

#[test]
fn udp_gso_on_by_default_and_off_by_file_or_flag() {
    assert!(ok("").udp_gso);
    assert!(!ok("udp_gso = false").udp_gso);
    let o = Overrides {
        udp_gso: Some(false),
        ..Overrides::default()
    };
    let c = from_toml_str("udp_gso = true", &o, env()).expect("config");
    assert!(!c.udp_gso, "the flag wins over the file");
}

#[test]
fn shard_ports_per_shard_by_default_or_shared() {
    assert_eq!(ok("").shard_ports, ShardPorts::PerShard);
    assert_eq!(
        ok(r#"shard_ports = "per-shard""#).shard_ports,
        ShardPorts::PerShard
    );
    let c = ok("shard_ports = \"shared\"\nshards = 4\nudp = \"127.0.0.1:65535\"");
    assert_eq!(c.shard_ports, ShardPorts::Shared);
    assert_eq!(c.shard_ports.as_str(), "shared");
    // Per-shard, the same would run past port 65535.
    let (field, msg) = err(
        "shards = 4\nudp = \"127.0.0.1:65535\"",
        &Overrides::default(),
    );
    assert_eq!(field, "shards", "{msg}");
    // The flag wins over the file.
    let over = Overrides {
        shard_ports: Some(ShardPorts::PerShard),
        ..Overrides::default()
    };
    let c = from_toml_str(r#"shard_ports = "shared""#, &over, env()).unwrap();
    assert_eq!(c.shard_ports, ShardPorts::PerShard);
    assert!(from_toml_str(r#"shard_ports = "one""#, &Overrides::default(), env()).is_err());
}

#[test]
fn kernel_defaults_and_values() {
    let c = ok("");
    assert_eq!(
        c.kernel,
        KernelConfig {
            xdp: XdpSetting::Auto,
            media_interfaces: vec![],
            guard_rate_pps: 10_000,
            guard_burst: 2_000,
            kernel_forwarding: true,
        }
    );
    let c = ok(r#"
        xdp = "off"
        media_interfaces = ["eth0", "ens1f0"]
        guard_rate_pps = 0
        guard_burst = 0
        kernel_forwarding = false
    "#);
    assert_eq!(c.kernel.xdp, XdpSetting::Off);
    assert_eq!(c.kernel.media_interfaces, vec!["eth0", "ens1f0"]);
    assert_eq!((c.kernel.guard_rate_pps, c.kernel.guard_burst), (0, 0));
    assert!(!c.kernel.kernel_forwarding);
    let o = Overrides {
        media_interfaces: vec!["b0".into()],
        xdp: Some(XdpSetting::Auto),
        ..Overrides::default()
    };
    let c = from_toml_str("xdp = \"off\"\nmedia_interfaces = [\"eth0\"]", &o, env()).unwrap();
    assert_eq!(c.kernel.xdp, XdpSetting::Auto);
    assert_eq!(c.kernel.media_interfaces, vec!["b0"]);
}

#[test]
fn kernel_settings_are_validated() {
    let o = Overrides::default();
    for bad in ["", "a/b", "eth 0", "sixteen-chars-xx", "..", "eth0:1"] {
        let (field, msg) = err(&format!("media_interfaces = [{bad:?}]"), &o);
        assert_eq!(field, "media_interfaces", "{bad:?}: {msg}");
    }
    let (field, _) = err("guard_rate_pps = 100\nguard_burst = 0", &o);
    assert_eq!(field, "guard_burst");
    assert!(from_toml_str("xdp = \"maybe\"", &o, env()).is_err());
    // A wildcard udp without interfaces is valid, with a warning.
    let c = ok("udp = \"0.0.0.0:5004\"\npublic_ip = [\"203.0.113.7\"]");
    assert!(
        c.warnings().iter().any(|w| w.contains("media_interfaces")),
        "{:?}",
        c.warnings()
    );
    let c = ok("udp = \"0.0.0.0:5004\"\npublic_ip = [\"203.0.113.7\"]\nxdp = \"off\"");
    assert!(c.warnings().is_empty());
}

#[test]
fn load_without_file_uses_defaults() {
    let c = load(None, &Overrides::default(), env()).unwrap();
    assert_eq!(c.http, DEFAULT_HTTP);
}

#[test]
fn file_values_are_used() {
    let c = ok(r#"
        http = "127.0.0.1:9000"
        udp = "0.0.0.0:0"
        public_ip = ["203.0.113.7", "203.0.113.7", "198.51.100.1"]
        drain_timeout = "1m 30s"
        max_sessions = 5
        pli_interval = "1s"
        log = "ridge_dataplane=debug,info"
    "#);
    assert_eq!(c.http.port(), 9000);
    assert_eq!(c.udp.port(), 0);
    assert_eq!(
        c.public_ip,
        vec![
            "203.0.113.7".parse::<IpAddr>().unwrap(),
            "198.51.100.1".parse().unwrap()
        ]
    );
    assert_eq!(c.drain_timeout, Duration::from_secs(90));
    assert_eq!(c.max_sessions, 5);
    assert_eq!(c.pli_interval, Duration::from_secs(1));
    assert_eq!(c.log, "ridge_dataplane=debug,info");
}

#[test]
fn precedence_flags_env_file_defaults() {
    let file = r#"
        http = "127.0.0.1:9000"
        max_sessions = 5
        drain_timeout = "20s"
        jwt_secret = "file-secret-file-secret"
        public_ip = ["127.0.0.2"]
    "#;
    // env beats file for the secret.
    let c = from_toml_str(file, &Overrides::default(), env()).unwrap();
    assert_eq!(c.jwt_secret.unwrap().expose(), SECRET);
    // file used when env unset (or empty).
    let c = from_toml_str(file, &Overrides::default(), None).unwrap();
    assert_eq!(c.jwt_secret.unwrap().expose(), "file-secret-file-secret");
    let c = from_toml_str(file, &Overrides::default(), Some(String::new())).unwrap();
    assert_eq!(c.jwt_secret.unwrap().expose(), "file-secret-file-secret");
    // flags beat file.
    let o = Overrides {
        http: Some("127.0.0.1:9100".parse().unwrap()),
        max_sessions: Some(7),
        drain_timeout: Some(Duration::from_secs(3)),
        public_ip: vec!["127.0.0.3".parse().unwrap()],
        jwt_secret: Some(Secret::new("flag-secret-flag-secret")),
        log: Some("debug".into()),
        ..Overrides::default()
    };
    let c = from_toml_str(file, &o, env()).unwrap();
    assert_eq!(c.http.port(), 9100);
    assert_eq!(c.max_sessions, 7);
    assert_eq!(c.drain_timeout, Duration::from_secs(3));
    assert_eq!(c.public_ip, vec!["127.0.0.3".parse::<IpAddr>().unwrap()]);
    assert_eq!(c.jwt_secret.unwrap().expose(), "flag-secret-flag-secret");
    assert_eq!(c.log, "debug");
}

#[test]
fn load_reads_file() {
    let dir = scratch();
    let path = dir.join("ridge.toml");
    std::fs::write(&path, "max_sessions = 3\n").unwrap();
    let c = load(Some(&path), &Overrides::default(), env()).unwrap();
    assert_eq!(c.max_sessions, 3);
}

#[test]
fn missing_file_is_read_error() {
    let path = scratch().join("nope.toml");
    let e = load(Some(&path), &Overrides::default(), env()).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert!(e.to_string().contains("nope.toml"), "{e}");
}

#[test]
fn parse_errors_have_line_and_column() {
    let e = from_toml_str(
        "max_sessions = 1\nbogus = 3\n",
        &Overrides::default(),
        env(),
    )
    .unwrap_err();
    let ConfigError::Parse { message, path } = &e else {
        panic!("{e:?}")
    };
    assert!(path.is_none());
    assert!(message.contains("line 2, column 1"), "{message}");
    assert!(message.contains("bogus"), "{message}");

    let e = from_toml_str("max_sessions = \"many\"\n", &Overrides::default(), env()).unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");

    let e = from_toml_str("http = \"not an address\"\n", &Overrides::default(), env()).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
}

#[test]
fn parse_errors_never_show_the_secret() {
    for src in [
        "jwt_secret = \"super-secret-value-123\n",
        "jwt_secret = 'super-secret-value-123' junk\n",
        "jwt_secret = 9876543210123456\n",
        "max_sessions = 1\njwt_secret = [\"super-secret-value-123\"]\n",
    ] {
        let e = from_toml_str(src, &Overrides::default(), None).unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(!text.contains("super-secret-value-123"), "{text}");
        assert!(!text.contains("9876543210123456"), "{text}");
        assert!(text.contains("line"), "{text}");
    }
}

#[test]
fn secret_missing() {
    let e = from_toml_str("", &Overrides::default(), None).unwrap_err();
    assert_eq!(e.field(), Some("jwt_secret"));
    let msg = e.to_string();
    assert!(msg.contains("RIDGE_JWT_SECRET"), "{msg}");
    assert!(msg.contains("jwt_secret"), "{msg}");
}

#[test]
fn secret_too_short() {
    let e = from_toml_str("", &Overrides::default(), Some("short".into())).unwrap_err();
    assert_eq!(e.field(), Some("jwt_secret"));
    let msg = e.to_string();
    assert!(msg.contains("16 bytes"), "{msg}");
    assert!(!msg.contains("short\""), "{msg}");
}

#[test]
fn dev_no_auth_needs_no_secret() {
    let c = from_toml_str("dev_no_auth = true", &Overrides::default(), None).unwrap();
    assert!(c.dev_no_auth);
    assert!(c.jwt_secret.is_none());
    assert_eq!(c.warnings().len(), 1);
    let o = Overrides {
        dev_no_auth: Some(true),
        ..Overrides::default()
    };
    let c = from_toml_str("", &o, None).unwrap();
    assert!(c.dev_no_auth);
}

#[test]
fn secret_never_in_debug_or_errors() {
    let c = ok("");
    let dbg = format!("{c:?} {c:#?}");
    assert!(!dbg.contains(SECRET), "{dbg}");
    assert!(dbg.contains("<redacted>"));
    let s = Secret::new(SECRET);
    assert_eq!(format!("{s}"), "<redacted>");
    assert_eq!(format!("{s:?}"), "<redacted>");
    let fc = parse_file_config(&format!("jwt_secret = \"{SECRET}\""), None).unwrap();
    assert!(!format!("{fc:?}").contains(SECRET));
    let o = Overrides {
        jwt_secret: Some(s),
        ..Overrides::default()
    };
    assert!(!format!("{o:?}").contains(SECRET));
    // Every validation error below is produced with the secret configured.
    let e = from_toml_str("max_sessions = 0", &Overrides::default(), env()).unwrap_err();
    assert!(!format!("{e} {e:?}").contains(SECRET));
}

#[test]
fn non_loopback_http_needs_tls_or_insecure() {
    let (field, msg) = err("http = \"0.0.0.0:8080\"", &Overrides::default());
    assert_eq!(field, "http");
    assert!(msg.contains("secure origin"), "{msg}");
    assert!(msg.contains("tls_cert/tls_key"), "{msg}");
    assert!(msg.contains("insecure_http = true"), "{msg}");

    let c = ok("http = \"0.0.0.0:8080\"\ninsecure_http = true");
    assert!(c.insecure_http);
    assert_eq!(c.warnings().len(), 1);
    let c = ok("http = \"[::1]:8080\"");
    assert!(c.tls.is_none());
}

#[test]
fn tls_both_or_neither() {
    let (c, k) = tls_files(CERT_PEM, KEY_PEM);
    let (field, msg) = err(
        &format!("tls_cert = {:?}", c.display().to_string()),
        &Overrides::default(),
    );
    assert_eq!(field, "tls_key");
    assert!(msg.contains("both"), "{msg}");
    let o = Overrides {
        tls_key: Some(k.clone()),
        ..Overrides::default()
    };
    let (field, _) = err("", &o);
    assert_eq!(field, "tls_cert");
    // Combined from file and flag.
    let conf = from_toml_str(
        &format!(
            "tls_cert = {:?}\nhttp = \"0.0.0.0:443\"",
            c.display().to_string()
        ),
        &o,
        env(),
    )
    .unwrap();
    assert_eq!(conf.tls, Some(TlsConfig { cert: c, key: k }));
}

#[test]
fn tls_files_must_exist_and_parse() {
    let (c, k) = tls_files(CERT_PEM, KEY_PEM);
    let missing = c.with_file_name("missing.pem");
    let with = |cert: &Path, key: &Path| Overrides {
        tls_cert: Some(cert.to_owned()),
        tls_key: Some(key.to_owned()),
        ..Overrides::default()
    };
    let (field, msg) = err("", &with(&missing, &k));
    assert_eq!(field, "tls_cert");
    assert!(msg.contains("missing.pem"), "{msg}");
    let (field, _) = err("", &with(&c, &missing));
    assert_eq!(field, "tls_key");

    // Cert file without certificates (a key instead).
    let (field, msg) = err("", &with(&k, &k));
    assert_eq!(field, "tls_cert");
    assert!(msg.contains("no PEM certificate"), "{msg}");
    // Key file without a key.
    let (field, msg) = err("", &with(&c, &c));
    assert_eq!(field, "tls_key");
    assert!(msg.contains("no PEM private key"), "{msg}");
    // Two keys.
    let (c2, k2) = tls_files(CERT_PEM, &format!("{KEY_PEM}{KEY_PEM}"));
    let (field, msg) = err("", &with(&c2, &k2));
    assert_eq!(field, "tls_key");
    assert!(msg.contains("exactly one"), "{msg}");
    // Broken PEM.
    let (c3, k3) = tls_files(
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        KEY_PEM,
    );
    let (field, msg) = err("", &with(&c3, &k3));
    assert_eq!(field, "tls_cert");
    assert!(msg.contains("not valid PEM"), "{msg}");
    let (c4, k4) = tls_files(CERT_PEM, "-----BEGIN PRIVATE KEY-----\nMIGH\n");
    let (field, _) = err("", &with(&c4, &k4));
    assert_eq!(field, "tls_key");

    // A chain of two certificates and an EC key are fine.
    let (c5, k5) = tls_files(
        &format!("{CERT_PEM}{CERT_PEM}"),
        "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n\
         -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n",
    );
    let conf = from_toml_str("", &with(&c5, &k5), env()).unwrap();
    assert!(conf.tls.is_some());
}

#[test]
fn public_ip_rules() {
    let (field, msg) = err("udp = \"0.0.0.0:5004\"", &Overrides::default());
    assert_eq!(field, "public_ip");
    assert!(msg.contains("public_ip"), "{msg}");
    let (field, _) = err("udp = \"[::]:5004\"", &Overrides::default());
    assert_eq!(field, "public_ip");

    let (field, msg) = err(
        "udp = \"0.0.0.0:5004\"\npublic_ip = [\"0.0.0.0\"]",
        &Overrides::default(),
    );
    assert_eq!(field, "public_ip");
    assert!(msg.contains("0.0.0.0"), "{msg}");
    let (field, _) = err("public_ip = [\"::\"]", &Overrides::default());
    assert_eq!(field, "public_ip");
    let (field, _) = err("public_ip = [\"224.0.0.1\"]", &Overrides::default());
    assert_eq!(field, "public_ip");
    // Family mismatch with a v4 socket.
    let (field, msg) = err("public_ip = [\"2001:db8::1\"]", &Overrides::default());
    assert_eq!(field, "public_ip");
    assert!(msg.contains("family"), "{msg}");

    let c = ok("udp = \"[::]:0\"\npublic_ip = [\"2001:db8::1\", \"203.0.113.7\"]");
    assert_eq!(c.public_ip.len(), 2);
    let c = ok("udp = \"[::1]:0\"");
    assert_eq!(c.public_ip, vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    let o = Overrides {
        udp: Some("0.0.0.0:0".parse().unwrap()),
        public_ip: vec!["192.0.2.1".parse().unwrap()],
        ..Overrides::default()
    };
    let c = from_toml_str("", &o, env()).unwrap();
    assert_eq!(c.public_ip, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
}

#[test]
fn durations_and_ranges() {
    let (field, msg) = err("drain_timeout = \"ten seconds\"", &Overrides::default());
    assert_eq!(field, "drain_timeout");
    assert!(msg.contains("10s"), "{msg}");
    let (field, _) = err("pli_interval = \"5\"", &Overrides::default());
    assert_eq!(field, "pli_interval");

    let (field, msg) = err("drain_timeout = \"11m\"", &Overrides::default());
    assert_eq!(field, "drain_timeout");
    assert!(msg.contains("10m"), "{msg}");
    assert_eq!(
        ok("drain_timeout = \"10m\"").drain_timeout,
        MAX_DRAIN_TIMEOUT
    );
    assert_eq!(ok("drain_timeout = \"0s\"").drain_timeout, Duration::ZERO);

    let (field, msg) = err("max_sessions = 0", &Overrides::default());
    assert_eq!(field, "max_sessions");
    assert!(msg.contains("at least 1"), "{msg}");

    let (field, msg) = err("pli_interval = \"10ms\"", &Overrides::default());
    assert_eq!(field, "pli_interval");
    assert!(msg.contains("50ms"), "{msg}");
    let (field, _) = err("pli_interval = \"11s\"", &Overrides::default());
    assert_eq!(field, "pli_interval");
    assert_eq!(ok("pli_interval = \"50ms\"").pli_interval, MIN_PLI_INTERVAL);
    assert_eq!(ok("pli_interval = \"10s\"").pli_interval, MAX_PLI_INTERVAL);
}

#[test]
fn control_socket_rules() {
    assert_eq!(
        default_control_socket(Some(0), Some("/run/user/0")),
        Some(PathBuf::from("/run/ridge/dataplane.sock"))
    );
    assert_eq!(
        default_control_socket(Some(1000), Some("/run/user/1000")),
        Some(PathBuf::from("/run/user/1000/ridge/dataplane.sock"))
    );
    assert_eq!(default_control_socket(Some(1000), None), None);
    assert_eq!(default_control_socket(Some(1000), Some("")), None);

    let c = ok("control_socket = \"/tmp/x/dp.sock\"");
    assert_eq!(c.control_socket, Some(PathBuf::from("/tmp/x/dp.sock")));
    assert!(!c.control_socket_is_default);
    let c = ok("control_socket = \"\"");
    assert_eq!(c.control_socket, None);
    let o = Overrides {
        control_socket: Some(PathBuf::from("/tmp/flag.sock")),
        ..Overrides::default()
    };
    let c = from_toml_str("control_socket = \"/tmp/file.sock\"", &o, env()).unwrap();
    assert_eq!(c.control_socket, Some(PathBuf::from("/tmp/flag.sock")));
    assert!(ok("").control_socket_is_default);

    let (field, msg) = err("control_socket = \"run/dp.sock\"", &Overrides::default());
    assert_eq!(field, "control_socket");
    assert!(msg.contains("absolute"), "{msg}");
    let long = format!("control_socket = \"/{}\"", "a".repeat(120));
    let (field, msg) = err(&long, &Overrides::default());
    assert_eq!(field, "control_socket");
    assert!(msg.contains("107"), "{msg}");
}

#[test]
fn bad_log_filter() {
    let (field, msg) = err("log = \"ridge=verbose!!\"", &Overrides::default());
    assert_eq!(field, "log");
    assert!(msg.contains("filter"), "{msg}");
}

#[test]
fn load_secret_for_token_command() {
    let e = load_secret(None, None).unwrap_err();
    assert!(e.to_string().contains("RIDGE_JWT_SECRET"), "{e}");
    assert!(load_secret(None, Some("short".into())).is_err());
    assert_eq!(load_secret(None, env()).unwrap().expose(), SECRET);

    let dir = scratch();
    let path = dir.join("ridge.toml");
    // The token command ignores unrelated settings that would fail validation.
    std::fs::write(
        &path,
        "jwt_secret = \"file-secret-file-secret\"\nhttp = \"0.0.0.0:80\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    // Readable by others: refused, without the secret in the message.
    let e = load_secret(Some(&path), None).unwrap_err().to_string();
    assert!(e.contains("readable by group or others"), "{e}");
    assert!(!e.contains("file-secret-file-secret"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        load_secret(Some(&path), None).unwrap().expose(),
        "file-secret-file-secret"
    );
    assert_eq!(load_secret(Some(&path), env()).unwrap().expose(), SECRET);
}

#[test]
fn error_display_names_field() {
    let e = invalid("max_sessions", "must be at least 1");
    assert_eq!(
        e.to_string(),
        "invalid configuration: max_sessions: must be at least 1"
    );
}

#[test]
fn codecs_default_to_all_and_are_ordered_by_file_or_flag() {
    use ridge_sfu::CodecSpec::*;
    assert_eq!(ok("").codecs, [Opus, Vp8, H264, Vp9, Av1]);
    assert_eq!(ok("codecs = [\"h264\", \"opus\"]").codecs, [H264, Opus]);
    let o = Overrides {
        codecs: vec![Vp9, Opus],
        ..Overrides::default()
    };
    let c = from_toml_str("codecs = [\"h264\"]", &o, env()).unwrap();
    assert_eq!(c.codecs, [Vp9, Opus], "the flag wins");
    let (field, msg) = err("codecs = []", &Overrides::default());
    assert_eq!(field, "codecs");
    assert!(msg.contains("at least one"), "{msg}");
    let (field, msg) = err("codecs = [\"vp8\", \"vp8\"]", &Overrides::default());
    assert_eq!(field, "codecs");
    assert!(msg.contains("twice"), "{msg}");
    assert!(from_toml_str("codecs = [\"h265\"]", &Overrides::default(), env()).is_err());
}
