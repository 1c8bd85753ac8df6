//! The `ringcast` binary itself: what a newcomer types.

use std::process::Command;

fn ringcast(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringcast")).args(args).output().expect("run ringcast")
}

#[test]
fn version_is_printed() {
    let out = ringcast(&["--version"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("ringcast {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let out = ringcast(&["serve", "--read-buffer", "bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`read_buffer`"));
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["serve"])
        .env("RINGCAST_PING_INTERVAL", "often")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ping_interval"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn genconfig_writes_a_config_that_loads_as_the_defaults() {
    let out = ringcast(&["genconfig"]);
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("ringcast-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ringcast.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let (config, _) = ringcast_server::Config::load(Some(&file), |_| None, &[]).expect("generated config loads");
    assert_eq!(config, ringcast_server::Config::default());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gentoken_makes_a_token_the_server_accepts() {
    let out = ringcast(&["gentoken", "--user", "alice", "--ttl", "1h", "--channels", "news", "--secret", "s3cret"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let verifier = ringcast_server::policy::auth::TokenVerifier::new(&ringcast_server::policy::auth::TokenConfig {
        hmac_secret: Some("s3cret".into()),
        rsa_public_key: None,
        ecdsa_public_key: None,
    })
    .unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = verifier.verify_connect(&token, now).expect("valid token");
    assert_eq!(claims.user, "alice");
    assert_eq!(claims.channels, vec!["news".to_string()]);
    assert!(claims.expires_at.is_some_and(|e| e > now + 3500 && e <= now + 3600));
    // Without a secret anywhere, it refuses (exit 2).
    let out = ringcast(&["gentoken", "--user", "bob"]);
    assert_eq!(out.status.code(), Some(2));
}
