//! Enrollment and credentials end to end over HTTPS against the real binary.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use ridge_scheduler::crypto::NodeTokenKey;
use ridge_scheduler::http::ROUTES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_and_credentials() {
    let dir = TempDir::new("enroll");
    let ca = write_cert(dir.path());
    let db = dir.path().join("s.db");
    let sched = Sched::start(dir.path(), &format!("sqlite:{}", db.display()), &[]);
    let c = client(&sched.url, &ca);

    // Good single-use token.
    let (tid, token) = mint(&c, "eu", 3600, 1, &[("trust_domain", "bb")]).await;
    let r = enroll(&c, &token).await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    let j = r.json();
    let node = Node {
        id: j["node_id"].as_str().unwrap().into(),
        token: j["node_token"].as_str().unwrap().into(),
    };
    assert!(node.id.starts_with("n-"));
    assert_eq!(j["region"], "eu");
    assert_eq!(j["labels"]["trust_domain"], "bb");
    assert_eq!(j["lease_misses"], 3);

    // Reused single-use token.
    let r = enroll(&c, &token).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "bootstrap_token_exhausted"),
        "{}",
        r.body
    );
    assert!(r.headers.contains_key("www-authenticate"));

    // Bad tokens: garbage, unknown id, right id with a wrong secret.
    for bad in [
        "garbage".to_owned(),
        "rbt_bt-0000000000000000.abc".to_owned(),
        format!("rbt_{tid}.wrongsecret"),
    ] {
        let r = enroll(&c, &bad).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (401, "bootstrap_token_invalid"),
            "{bad}: {}",
            r.body
        );
        assert!(!r.body.contains("wrongsecret"));
    }

    // Revoked.
    let (rid, rtoken) = mint(&c, "eu", 3600, 5, &[]).await;
    let r = c
        .call::<()>(
            Method::DELETE,
            &format!("/v1/tokens/{rid}"),
            Some(ADMIN),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(r.json()["state"], "revoked");
    let r = enroll(&c, &rtoken).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "bootstrap_token_revoked")
    );
    let r = c
        .call::<()>(Method::DELETE, "/v1/tokens/bt-nope", Some(ADMIN), None)
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), r.code().as_str()), (404, "not_found"));

    // Expired (ttl 1 s).
    let (_, etoken) = mint(&c, "eu", 1, 1, &[]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = enroll(&c, &etoken).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "bootstrap_token_expired")
    );

    // Multi-use token works max_uses times.
    let (_, mtoken) = mint(&c, "us", 3600, 2, &[]).await;
    let n2 = enroll_ok(&c, &mtoken).await;
    let _n3 = enroll_ok(&c, &mtoken).await;
    let r = enroll(&c, &mtoken).await;
    assert_eq!(r.code(), "bootstrap_token_exhausted");

    // Proof and key checks.
    let (_, ptoken) = mint(&c, "eu", 3600, 1, &[]).await;
    let mut req = enroll_request(&ptoken);
    req.proof = enroll_request(&ptoken).proof; // signed by another key
    let r = c.post("/v1/enroll", None, &req).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (400, "invalid_proof")
    );
    let mut req = enroll_request(&ptoken);
    req.public_key.key = "AAAA".into();
    let r = c.post("/v1/enroll", None, &req).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (400, "invalid_public_key")
    );
    let mut req = enroll_request(&ptoken);
    req.public_key.alg = "rsa".into();
    let r = c.post("/v1/enroll", None, &req).await.unwrap();
    assert_eq!(r.code(), "invalid_public_key");
    // A failed attempt did not use the token up.
    enroll_ok(&c, &ptoken).await;

    // Malformed bodies.
    for (ct, body) in [
        ("application/json", b"{not json".to_vec()),
        ("application/json", b"[]".to_vec()),
        ("application/json", br#"{"bootstrap_token":"x"}"#.to_vec()),
        ("text/plain", b"{}".to_vec()),
    ] {
        let r = c
            .call_raw(Method::POST, "/v1/enroll", None, ct, body)
            .await
            .unwrap();
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (400, "malformed_body"),
            "{}",
            r.body
        );
    }
    let mut v = serde_json::to_value(enroll_request(&ptoken)).unwrap();
    v["extra"] = serde_json::json!(1);
    let r = c.post("/v1/enroll", None, &v).await.unwrap();
    assert_eq!(r.code(), "malformed_body", "unknown fields are refused");
    let r = c
        .call_raw(
            Method::POST,
            "/v1/enroll",
            None,
            "application/json",
            vec![b' '; 2 << 20],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (413, "body_too_large")
    );

    // Node credentials.
    let hb = report("127.0.0.1:5004", 0.1, &[], &[]);
    let path = format!("/v1/nodes/{}/heartbeat", node.id);
    let r = heartbeat(&c, &node, &hb).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    let r = c.post(&path, None, &hb).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "missing_credential")
    );
    let forged = NodeTokenKey::new("not-the-scheduler-key").sign(&node.id, now(), 3600);
    let r = c.post(&path, Some(&forged), &hb).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "invalid_credential")
    );
    let r = c.post(&path, Some("garbage"), &hb).await.unwrap();
    assert_eq!(r.code(), "invalid_credential");
    // Genuine signature (key read from the database) for a node that does not exist.
    let key = read_setting(&db, "node_token_key").await;
    let ghost = NodeTokenKey::new(&key).sign("n-0000000000000000", now(), 3600);
    let r = c
        .post("/v1/nodes/n-0000000000000000/heartbeat", Some(&ghost), &hb)
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "unknown_node")
    );
    let expired = NodeTokenKey::new(&key).sign(&node.id, now() - 7200, 60);
    let r = c.post(&path, Some(&expired), &hb).await.unwrap();
    assert_eq!(r.code(), "credential_expired");
    // Another node's token, the admin token, a node token on operator routes.
    let r = c.post(&path, Some(&n2.token), &hb).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (403, "node_mismatch")
    );
    let r = c.post(&path, Some(ADMIN), &hb).await.unwrap();
    assert_eq!((r.status.as_u16(), r.code().as_str()), (403, "forbidden"));
    let r = c.get("/v1/nodes", Some(&node.token)).await.unwrap();
    assert_eq!((r.status.as_u16(), r.code().as_str()), (403, "forbidden"));
    let r = c.get("/v1/nodes", Some(DISPATCH)).await.unwrap();
    assert_eq!(r.code(), "forbidden");
    let r = c
        .get("/v1/nodes", Some("wrong-admin-token-xxxx"))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "invalid_credential")
    );
    // Bad heartbeat values and bodies.
    let mut bad = hb.clone();
    bad.load.cpu = 3.0;
    let r = heartbeat(&c, &node, &bad).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (400, "invalid_request")
    );
    let r = c
        .call_raw(
            Method::POST,
            &path,
            Some(&node.token),
            "application/json",
            b"{\"load\":5}".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(r.code(), "malformed_body");

    // Every route exists and authenticates, but the probes.
    for (method, route) in ROUTES {
        let p = route.replace("{id}", &node.id);
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = c.call::<()>(m, &p, None, None).await.unwrap();
        if *route == "/v1/enroll" {
            assert_eq!(r.code(), "malformed_body", "{method} {route}");
        } else if matches!(*route, "/livez" | "/readyz") {
            // The probes: no credential, a status code and no body.
            assert_eq!((r.status.as_u16(), r.body.as_str()), (200, ""), "{route}");
        } else {
            assert_eq!(
                (r.status.as_u16(), r.code().as_str()),
                (401, "missing_credential"),
                "{method} {route}"
            );
        }
    }
    let r = c.get("/v1/nope", Some(ADMIN)).await.unwrap();
    assert_eq!((r.status.as_u16(), r.code().as_str()), (404, "not_found"));
    let r = c
        .call::<()>(Method::PUT, "/v1/tokens", Some(ADMIN), None)
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (405, "method_not_allowed")
    );
    let r = c.get("/openapi.json", Some(&node.token)).await.unwrap();
    assert_eq!(r.json()["openapi"], "3.1.0");

    // Token listing shows states and no secrets.
    let r = c.get("/v1/tokens", Some(ADMIN)).await.unwrap();
    let tokens = r.json()["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 5);
    assert!(tokens.iter().all(|t| t.get("token").is_none()));
    let states: Vec<&str> = tokens
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    for s in ["exhausted", "revoked", "expired"] {
        assert!(states.contains(&s), "{states:?}");
    }

    // Refusals are counted by code.
    let m = c.get("/metrics", Some(ADMIN)).await.unwrap().body;
    for code in [
        "ok",
        "bootstrap_token_exhausted",
        "bootstrap_token_invalid",
        "bootstrap_token_revoked",
        "bootstrap_token_expired",
        "invalid_proof",
        "invalid_public_key",
        "malformed_body",
    ] {
        assert!(
            m.contains(&format!(
                "ridge_scheduler_enrollments_total{{code=\"{code}\"}}"
            )),
            "{code} not counted:\n{m}"
        );
    }
    assert!(
        m.contains("ridge_scheduler_errors_total{code=\"unknown_node\"} 1"),
        "{m}"
    );

    // Secrets never reach the log.
    let log = sched.log();
    assert!(log.contains("node enrolled"), "{log}");
    for secret in [
        ADMIN,
        DISPATCH,
        token.as_str(),
        node.token.as_str(),
        forged.as_str(),
    ] {
        assert!(!log.contains(secret), "a secret leaked into the log");
    }
    let secret_part = token.split('.').nth(1).unwrap();
    assert!(!log.contains(secret_part));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_exits_64_before_binding() {
    let dir = TempDir::new("cfg");
    write_cert(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ridge-scheduler"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(dir.path().join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        .env_remove("RIDGE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin_token"));
}

fn now() -> u64 {
    ridge_scheduler::store::now_secs()
}

async fn read_setting(db: &std::path::Path, key: &str) -> String {
    use sqlx::Row;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let v: String = sqlx::query("SELECT value FROM settings WHERE key = $1")
        .bind(key)
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("value");
    pool.close().await;
    v
}
