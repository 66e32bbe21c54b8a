//! End-to-end tests of configuration handling and the `token` / `check-config`
//! subcommands, against the real binary.
//!
//! Expected behaviour of `main.rs`: config errors go to stderr (naming the
//! field) with exit status 64 (`config::EXIT_CONFIG`); `token` prints the JWT on
//! stdout; `check-config` exits 0 for a valid configuration.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use ridge_dataplane::auth::Authenticator;
use ridge_dataplane::config::{EXIT_CONFIG, Secret};

const BIN: &str = env!("CARGO_BIN_EXE_ridge-dataplane");
const SECRET: &str = "integration-test-secret-0123456789";

/// A fresh scratch directory under Cargo's per-target temp dir.
fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "config_cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_config(contents: &str) -> PathBuf {
    let path = scratch().join("ridge.toml");
    std::fs::write(&path, contents).unwrap();
    // A file holding jwt_secret must be private to the node's user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Runs the binary with a clean environment as far as Ridge is concerned.
fn run(args: &[&str], secret: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RIDGE_JWT_SECRET")
        .env_remove("RUST_LOG");
    if let Some(secret) = secret {
        cmd.env("RIDGE_JWT_SECRET", secret);
    }
    cmd.output().expect("run ridge-dataplane")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_config_error(out: &Output, field: &str) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "status {:?}, stderr: {err}",
        out.status
    );
    assert!(err.contains(field), "stderr does not name `{field}`: {err}");
    assert!(!err.contains(SECRET), "stderr leaks the secret: {err}");
    assert!(!stdout(out).contains(SECRET), "stdout leaks the secret");
}

#[test]
fn help_mentions_secret_env() {
    let out = run(&["--help"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("RIDGE_JWT_SECRET"), "{text}");
    assert!(text.contains("token"), "{text}");
    assert!(text.contains("check-config"), "{text}");
}

#[test]
fn version_flag() {
    let out = run(&["--version"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_good_file_exits_0() {
    let path = write_config(
        r#"
        http = "127.0.0.1:0"
        udp = "127.0.0.1:0"
        max_sessions = 10
        drain_timeout = "2s"
        pli_interval = "250ms"
        log = "info"
        "#,
    );
    let out = run(
        &["check-config", "--config", path.to_str().unwrap()],
        Some(SECRET),
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!stdout(&out).contains(SECRET) && !stderr(&out).contains(SECRET));

    // The secret may also come from the file.
    let path = write_config(&format!("jwt_secret = \"{SECRET}\"\n"));
    let out = run(&["check-config", "--config", path.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!stdout(&out).contains(SECRET) && !stderr(&out).contains(SECRET));
}

#[test]
fn check_config_bad_values_exit_64_naming_the_field() {
    let cases: &[(&str, &str)] = &[
        ("max_sessions = 0\n", "max_sessions"),
        ("drain_timeout = \"forever\"\n", "drain_timeout"),
        ("drain_timeout = \"1h\"\n", "drain_timeout"),
        ("pli_interval = \"1ms\"\n", "pli_interval"),
        ("http = \"0.0.0.0:8080\"\n", "http"),
        ("udp = \"0.0.0.0:5004\"\n", "public_ip"),
        ("tls_cert = \"/nonexistent/cert.pem\"\n", "tls_key"),
        (
            "tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n",
            "tls_cert",
        ),
        ("log = \"a=b=c\"\n", "log"),
    ];
    for (contents, field) in cases {
        let path = write_config(contents);
        let out = run(
            &["check-config", "--config", path.to_str().unwrap()],
            Some(SECRET),
        );
        assert_config_error(&out, field);
    }
}

#[test]
fn bad_config_file_syntax_exits_64() {
    let path = write_config("max_sessions = 1\nunknown_field = true\n");
    let out = run(
        &["check-config", "--config", path.to_str().unwrap()],
        Some(SECRET),
    );
    assert_config_error(&out, "unknown_field");
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));

    let missing = scratch().join("missing.toml");
    let out = run(
        &["check-config", "--config", missing.to_str().unwrap()],
        Some(SECRET),
    );
    assert_config_error(&out, "missing.toml");
}

#[test]
fn missing_or_short_secret_exits_64() {
    // Running the node (no subcommand) must fail before binding anything.
    let out = run(&["--http", "127.0.0.1:0", "--udp", "127.0.0.1:0"], None);
    assert_config_error(&out, "RIDGE_JWT_SECRET");

    let out = run(&["check-config"], None);
    assert_config_error(&out, "RIDGE_JWT_SECRET");

    let out = run(&["check-config"], Some("too-short"));
    assert_config_error(&out, "jwt_secret");
    assert!(!stderr(&out).contains("too-short"), "{}", stderr(&out));
}

#[test]
fn bad_flag_on_run_exits_64() {
    let out = run(
        &[
            "--http",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--max-sessions",
            "0",
        ],
        Some(SECRET),
    );
    assert_config_error(&out, "max_sessions");
}

#[test]
fn token_prints_a_verifiable_jwt() {
    let out = run(
        &[
            "token",
            "--room",
            "demo",
            "--identity",
            "alice",
            "--publish",
            "--subscribe",
            "--ttl",
            "10m",
        ],
        Some(SECRET),
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let token = stdout(&out).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    assert!(!token.contains(char::is_whitespace), "{token:?}");

    let auth = Authenticator::new(Some(&Secret::new(SECRET)), false);
    let claims = auth.verify(&token).expect("token verifies");
    assert_eq!(claims.room, "demo");
    assert_eq!(claims.sub, "alice");
    assert!(claims.can_publish && claims.can_subscribe && !claims.admin);
    assert!(claims.exp > claims.iat && claims.exp - claims.iat == 600);

    // Another secret does not verify it.
    let other = Authenticator::new(Some(&Secret::new("some-other-secret-0123456789")), false);
    assert!(other.verify(&token).is_err());
}

#[test]
fn token_secret_from_config_file() {
    let path = write_config(&format!("jwt_secret = \"{SECRET}\"\n"));
    let out = run(
        &[
            "token",
            "--room",
            "*",
            "--identity",
            "ops",
            "--admin",
            "--config",
            path.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let token = stdout(&out).trim().to_owned();
    let claims = Authenticator::new(Some(&Secret::new(SECRET)), false)
        .verify(&token)
        .expect("token verifies");
    assert!(claims.admin && claims.admits_room("anything"));
}

#[test]
fn token_without_secret_exits_64() {
    let out = run(&["token", "--room", "demo", "--identity", "alice"], None);
    assert_config_error(&out, "RIDGE_JWT_SECRET");
    assert!(stdout(&out).trim().is_empty());
}
