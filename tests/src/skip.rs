//! Prerequisite checks for tests that need a browser or privileges.
//!
//! Outside CI such tests are skipped (with a `SKIP` line on stderr) when a
//! prerequisite is missing; in CI (`RIDGE_REQUIRE_ALL=1`, set by `.ci/run`)
//! a missing prerequisite fails the test instead.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::chromium::chromium_binary;

/// Returns `Ok(())` if `check` holds. Otherwise: with `RIDGE_REQUIRE_ALL=1`
/// it panics (`required test prerequisite missing: …`); without it prints
/// `SKIP <test>: <why>` to stderr and returns `Err(())` so the test can
/// `return`.
// `Err(())` is the documented contract: callers only test `.is_err()`.
#[allow(clippy::result_unit_err)]
pub fn require(test: &str, check: Result<(), String>) -> Result<(), ()> {
    let Err(why) = check else {
        return Ok(());
    };
    if std::env::var("RIDGE_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("required test prerequisite missing: {why}");
    }
    // Written to the real stderr, not via eprintln!, so that libtest's output
    // capture does not hide the SKIP line of a passing test.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    Err(())
}

/// Checks that the Chromium binary (`$RIDGE_CHROMIUM` or `/usr/bin/chromium`)
/// runs `--version` successfully.
pub fn chromium_present() -> Result<(), String> {
    let binary = chromium_binary();
    let hint = "install it with `bash tests/install-deps.sh --test` or set RIDGE_CHROMIUM";
    let output = Command::new(&binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} ({e}); {hint}", binary.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}; {hint}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Checks that `ffmpeg` runs and has the libx264 encoder (Debian's
/// package has it).
pub fn ffmpeg_with_x264() -> Result<(), String> {
    let hint = "install it with `bash tests/install-deps.sh --test`";
    let output = Command::new("ffmpeg")
        .args(["-hide_banner", "-encoders"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ffmpeg ({e}); {hint}"))?;
    if !output.status.success() || !String::from_utf8_lossy(&output.stdout).contains("libx264") {
        return Err(format!("ffmpeg without the libx264 encoder; {hint}"));
    }
    Ok(())
}
