//! Configuration errors through the real binary: `check-config`, `serve` and a client command
//! reading `--config` each name the key and position of every problem, and never show a secret.
//! Every file carries a marker secret somewhere it should not be echoed from.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The marker secret, and parts of it that must not show either.
const MARKER: &str = "MARKER-s3cr3t-7f1e";
const INT_MARKER: &str = "987654321987";
const NEVER_SHOWN: &[&str] = &[MARKER, "s3cr3t", INT_MARKER];

/// Lines 1 to 6 of every file; a case's own lines start at line 7, in `[zoom]`.
const HEAD: &str = "[socket]\npath = \"zoomq.sock\"\n[storage]\npath = \"data\"\n\
                    [zoom]\nclient_id = \"test-client\"\n";

fn zoomq(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoomq"))
        .args(args)
        .current_dir(dir)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("ZOOMQ_CLIENT_SECRET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run zoomq")
}

/// Writes `text` as `zoomq.toml` in a fresh directory that also holds the secret files the
/// cases point at, then runs `check-config`, `serve` and `stats --config` on it. Each must fail
/// without showing the marker; `check-config` and `serve` must print `expect` (file, position,
/// key), and so must `stats` when `client_too` (it neither validates nor reads the secret).
fn assert_safe_error(text: impl AsRef<[u8]>, expect: &str, client_too: bool) {
    let text = text.as_ref();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(format!("{MARKER}.d"))).unwrap();
    std::fs::write(dir.path().join("secret.txt"), format!("{MARKER}\n")).unwrap();
    let mut invalid_utf8 = MARKER.as_bytes().to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, b'\n']);
    std::fs::write(dir.path().join("secret.bin"), invalid_utf8).unwrap();
    std::fs::write(dir.path().join("zoomq.toml"), text).unwrap();

    let commands: [&[&str]; 3] = [
        &["check-config", "zoomq.toml"],
        &["serve", "--config", "zoomq.toml"],
        &["stats", "--config", "zoomq.toml"],
    ];
    for args in commands {
        let output = zoomq(dir.path(), args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let file = String::from_utf8_lossy(text);
        let shown = format!("--- stdout\n{stdout}--- stderr\n{stderr}--- file\n{file}");
        assert!(!output.status.success(), "{args:?} succeeded\n{shown}");
        for secret in NEVER_SHOWN {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{args:?} shows {secret:?}\n{shown}"
            );
        }
        if args[0] != "stats" || client_too {
            assert!(
                stdout.contains(expect) || stderr.contains(expect),
                "{args:?} does not say {expect:?}\n{shown}"
            );
        }
    }
    assert!(
        !dir.path().join("zoomq.sock").exists(),
        "serve bound its socket"
    );
}

fn with_head(lines: &str) -> String {
    format!("{HEAD}{lines}")
}

#[test]
fn syntax_error_on_the_secret_line() {
    let text = with_head(&format!("client_secret = \"{MARKER}\nplan = \"pro\"\n"));
    assert_safe_error(
        &text,
        "zoomq.toml:7:36: zoom.client_secret: invalid basic string",
        true,
    );
}

#[test]
fn unquoted_secret() {
    let text = with_head(&format!("client_secret = {MARKER}\n"));
    assert_safe_error(&text, "zoomq.toml:7:17: zoom.client_secret: ", true);
}

#[test]
fn secret_of_the_wrong_type() {
    for (value, found) in [
        (INT_MARKER.to_string(), "integer"),
        (format!("[\"{MARKER}\"]"), "array"),
        (format!("{{ value = \"{MARKER}\" }}"), "table"),
    ] {
        let text = with_head(&format!("client_secret = {value}\n"));
        let expect = format!(
            "zoomq.toml:7:17: zoom.client_secret: expected a string, found {found} \
             (value not shown: this key holds a secret)"
        );
        assert_safe_error(&text, &expect, true);
    }
}

#[test]
fn secret_in_a_wrong_table() {
    let text = with_head(&format!("[metrics]\nclient_secret = \"{MARKER}\"\n"));
    assert_safe_error(
        &text,
        "zoomq.toml:8:1: metrics.client_secret: unknown field `client_secret`",
        true,
    );
}

#[test]
fn secret_at_top_level() {
    let text = format!("client_secret = \"{MARKER}\"\n{HEAD}");
    assert_safe_error(
        &text,
        "zoomq.toml:1:1: client_secret: unknown field `client_secret`, expected one of `socket`",
        true,
    );
}

#[test]
fn misspelt_secret_key_of_the_wrong_type() {
    let text = with_head(&format!("client_secert = {INT_MARKER}\n"));
    assert_safe_error(
        &text,
        "zoomq.toml:7:1: zoom.client_secert: unknown field `client_secert`",
        true,
    );
}

#[test]
fn secret_file_is_a_directory() {
    // The directory's name is the marker: the path a secret-file key holds is not shown either
    // (a secret written there by mistake would be).
    let text = with_head(&format!("client_secret_file = \"{MARKER}.d\"\n"));
    assert_safe_error(
        &text,
        "zoomq.toml:7:22: zoom.client_secret_file: cannot read the file it names: ",
        false,
    );
}

#[test]
fn secret_file_is_not_utf8() {
    let text = with_head("client_secret_file = \"secret.bin\"\n");
    assert_safe_error(
        &text,
        "zoomq.toml:7:22: zoom.client_secret_file: cannot read the file it names: ",
        false,
    );
}

#[test]
fn secret_written_as_the_secret_file() {
    let text = with_head(&format!("client_secret_file = \"{MARKER}\"\n"));
    assert_safe_error(
        &text,
        "zoomq.toml:7:22: zoom.client_secret_file: cannot read the file it names: ",
        false,
    );
}

#[test]
fn secret_and_secret_file_both_set() {
    let text = with_head(&format!(
        "client_secret = \"{MARKER}\"\nclient_secret_file = \"secret.txt\"\n"
    ));
    assert_safe_error(
        &text,
        "zoomq.toml:8:22: zoom.client_secret_file: set either zoom.client_secret or \
         zoom.client_secret_file, not both",
        false,
    );
}

#[test]
fn unknown_key_next_to_the_secret() {
    let text = with_head(&format!(
        "client_secret = \"{MARKER}\"\nclient_name = \"bot\"\n"
    ));
    assert_safe_error(
        &text,
        "zoomq.toml:8:1: zoom.client_name: unknown field `client_name`",
        true,
    );
}

#[test]
fn secret_line_then_an_unterminated_multiline_string() {
    let text = with_head(&format!(
        "client_secret = \"{MARKER}\"\napi_base = \"\"\"https://api.zoom.us/v2\n\n"
    ));
    assert_safe_error(&text, ": zoom.api_base: ", true);
}

#[test]
fn secret_in_a_multiline_string_then_a_syntax_error() {
    let text = with_head(&format!(
        "client_secret = \"\"\"\n{MARKER}\n\"\"\"\nplan = pro\n"
    ));
    assert_safe_error(&text, "zoomq.toml:10:8: zoom.plan: ", true);
}

#[test]
fn cluster_style_secret_key_with_a_syntax_error() {
    // Keys zoomq does not know yet are covered by their names ("password", "nkey", "key"...).
    let text = format!("{HEAD}[cluster]\nnats_password = \"{MARKER}\n");
    assert_safe_error(&text, "zoomq.toml:8:36: cluster.nats_password: ", true);
}

#[test]
fn control_character_in_the_secret() {
    let text = with_head(&format!("client_secret = \"{MARKER}\u{1}\"\n"));
    assert_safe_error(&text, "zoomq.toml:7:36: zoom.client_secret: ", true);
}

#[test]
fn config_file_not_utf8_on_the_secret_line() {
    let mut text = with_head(&format!("client_secret = \"{MARKER}")).into_bytes();
    text.extend_from_slice(b"\xff\"\n");
    assert_safe_error(
        &text,
        "zoomq.toml:7:36: zoom.client_secret: the file is not UTF-8 text",
        true,
    );
}

/// Two unrelated problems (a type error and a bad value) are both reported, each with its key
/// and position; and a type error does not hide a validation error elsewhere.
#[test]
fn every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[storage]\nmax_pending = -5\n[zoom]\nclient_id = \"test-client\"\n\
         client_secret = \"{MARKER}\"\nplan = \"platinum\"\n[delivery]\nconcurrency = 0\n"
    );
    std::fs::write(dir.path().join("zoomq.toml"), &text).unwrap();
    let output = zoomq(dir.path(), &["check-config", "zoomq.toml"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "zoomq.toml:2:15: storage.max_pending: invalid value: integer `-5`, expected u64",
            "zoomq.toml:6:8: zoom.plan: unknown variant `platinum`, expected one of `free`, `pro`, `business`",
            "zoomq.toml:8:15: delivery.concurrency: expected between 1 and 10000",
        ],
        "{stdout}"
    );
    assert!(!stdout.contains(MARKER), "{stdout}");
}

#[test]
fn valid_file_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let text = with_head("client_secret_file = \"secret.txt\"\n");
    std::fs::write(dir.path().join("secret.txt"), format!("{MARKER}\n")).unwrap();
    std::fs::write(dir.path().join("zoomq.toml"), text).unwrap();
    let output = zoomq(dir.path(), &["check-config", "zoomq.toml"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert_eq!(stdout, "zoomq.toml: ok\n");
}
