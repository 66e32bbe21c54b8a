//! HTTPS on the control port: a node started with a self-signed
//! certificate (rcgen) answers HTTPS, and refuses plain HTTP on the same
//! port. Checked with curl, a client that shares no code with the node.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ridge_dataplane::config::Overrides;
use ridge_tests::node::TestNode;
use ridge_tests::skip::require;
use serde_json::Value;
use tokio::process::Command;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn curl_present() -> Result<(), String> {
    match std::process::Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("curl --version failed ({s})")),
        Err(e) => Err(format!(
            "cannot run curl ({e}); install it with tests/install-deps.sh"
        )),
    }
}

/// What curl made of one request.
#[derive(Debug)]
struct Curl {
    /// curl's exit status.
    exit: i32,
    /// `%{http_code}`: "000" when no HTTP response came.
    code: String,
    body: String,
    #[expect(dead_code, reason = "shown in failure messages through Debug")]
    stderr: String,
}

async fn curl(args: &[&str], url: &str, dir: &Path) -> Result<Curl> {
    let body_file = dir.join("curl-body");
    let _ = std::fs::remove_file(&body_file);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("curl")
            .args(["-s", "-S", "--max-time", "10", "-o"])
            .arg(&body_file)
            .args(["-w", "%{http_code}"])
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("curl did not finish")?
    .context("running curl")?;
    Ok(Curl {
        exit: out.status.code().unwrap_or(-1),
        code: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        body: std::fs::read_to_string(&body_file).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_self_signed_certificate() {
    if require("https_with_a_self_signed_certificate", curl_present()).is_err() {
        return;
    }
    init_tracing();
    tls_inner().await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn tls_inner() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    // The node refuses a key that group or others may read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;

    let node = TestNode::start_with(Overrides {
        http: Some("127.0.0.1:0".parse()?),
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path),
        tls_handshake_timeout: Some(std::time::Duration::from_secs(1)),
        ..Overrides::default()
    })
    .await?;
    let base = node.node.base_url();
    let port = node.node.http_addr().port();
    ensure!(
        base == format!("https://127.0.0.1:{port}"),
        "base_url {base}"
    );

    let admin = format!("Authorization: Bearer {}", node.admin_token());
    let https = format!("https://127.0.0.1:{port}/healthz");

    // -k: the certificate is self-signed.
    let r = curl(&["-k", "-H", &admin], &https, dir.path()).await?;
    ensure!(
        r.exit == 0 && r.code == "200",
        "https /healthz with an admin token: {r:?}"
    );
    let health: Value = serde_json::from_str(&r.body).context("healthz body")?;
    ensure!(health["status"] == "ok", "{health}");
    ensure!(
        health["media"] == node.node.udp_addr().to_string(),
        "{health}"
    );

    // The certificate really is the one generated: verifying against it as
    // the CA (instead of -k) succeeds.
    let cacert = cert_path.to_string_lossy().to_string();
    let r = curl(&["--cacert", &cacert, "-H", &admin], &https, dir.path()).await?;
    ensure!(r.exit == 0 && r.code == "200", "https with --cacert: {r:?}");

    // Without -k or a CA, curl refuses the self-signed certificate (exit 60).
    let r = curl(&["-H", &admin], &https, dir.path()).await?;
    ensure!(
        r.exit == 60 && r.code == "000",
        "unverified self-signed certificate: {r:?}"
    );

    // Auth works the same over TLS.
    let r = curl(&["-k"], &https, dir.path()).await?;
    ensure!(r.exit == 0 && r.code == "401", "no token over https: {r:?}");
    let v: Value = serde_json::from_str(&r.body).context("401 body")?;
    ensure!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");

    // Plain HTTP to the TLS port gets no HTTP response.
    let r = curl(
        &["-H", &admin],
        &format!("http://127.0.0.1:{port}/healthz"),
        dir.path(),
    )
    .await?;
    ensure!(
        r.exit != 0 && r.code == "000",
        "plain http to the TLS port answered: {r:?}"
    );

    // A connection that never starts its handshake, and one that stops in
    // the middle of its ClientHello, are closed by the handshake timeout.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let opened = std::time::Instant::now();
        let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut partial = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        // A TLS record header announcing 512 bytes, then nothing.
        partial
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await?;
        for s in [&mut silent, &mut partial] {
            let mut buf = [0u8; 64];
            let closed = tokio::time::timeout(std::time::Duration::from_secs(4), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            ensure!(
                closed.is_ok(),
                "a stalled TLS handshake is still open after {:?}",
                opened.elapsed()
            );
        }
    }

    // The node is still healthy after the plain-HTTP attempt.
    let r = curl(&["-k", "-H", &admin], &https, dir.path()).await?;
    ensure!(r.exit == 0 && r.code == "200", "https after http: {r:?}");
    Ok(())
}
