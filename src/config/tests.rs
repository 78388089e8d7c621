//! Tests of the configuration: parsing, every problem at once, secrets never shown, defaults.

use std::time::Duration;

use super::*;

fn problems(text: &str) -> String {
    match Config::parse(text) {
        Err(e) => e.to_string(),
        Ok(config) => config
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    }
}

#[test]
fn unknown_key_is_named() {
    let message = problems("[socket]\npaht = \"/tmp/x\"\n");
    assert!(message.contains("paht"), "{message}");
}

#[test]
fn bad_values_are_named() {
    let message = problems("[zoom]\nplan = \"gold\"\n");
    assert!(
        message.contains("gold") && message.contains("plan"),
        "{message}"
    );
    let message = problems("[delivery]\nretry_max = \"soon\"\n");
    assert!(
        message.contains("retry_max") && message.contains("duration"),
        "{message}"
    );
    let message = problems("[socket]\nmode = \"999\"\n");
    assert!(
        message.contains("mode") && message.contains("octal"),
        "{message}"
    );
}

#[test]
fn every_problem_is_reported() {
    let text = "[zoom]\nclient_id = \"\"\nclient_secret = \"s\"\napi_base = \"ftp:/x\"\n\
                [delivery]\nconcurrency = 0\n[metrics]\nlisten = \"nope\"\n";
    let message = problems(text);
    for key in [
        "zoom.client_id",
        "zoom.api_base",
        "delivery.concurrency",
        "metrics.listen",
    ] {
        assert!(message.contains(key), "{key} missing from {message}");
    }
}

#[test]
fn secret_never_in_debug() {
    let mut config = Config::default();
    config.set_client_secret("hunter2-very-secret");
    let debug = format!("{config:?} {:?}", config.client_secret().unwrap());
    assert!(!debug.contains("hunter2"), "{debug}");
    config.zoom.client_secret_file = Some("hunter2-as-a-path".into());
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[test]
fn syntax_error_names_key_and_position_not_the_line() {
    let text = "[zoom]\nclient_id = \"x\"\nclient_secret = \"hunter2-secret\n";
    assert_eq!(
        problems(text),
        "3:32: zoom.client_secret: invalid basic string, expected `\"`"
    );
    // A statement going on over several lines keeps its key.
    let text = "[socket]\nallowed_uids = [\n  1,\n  x,\n]\n";
    assert!(problems(text).starts_with("4:3: socket.allowed_uids: "));
    let text = "[zoom]\nclient_secret = '''\nhunter2\n";
    assert!(problems(text).starts_with("4:1: zoom.client_secret: "));
    // Never the text of a line that is no key.
    let text = "[zoom]\nhunter2-pasted-alone\n";
    assert!(problems(text).starts_with("2:"), "{}", problems(text));
    assert!(!problems(text).contains("hunter2"));
}

#[test]
fn type_and_value_errors_of_every_key_at_once() {
    let text = "[storage]\nmax_pending = -5\nmax_pendnig = 1\n[zoom]\nplan = \"platinum\"\n\
                client_secret = 42424242\n[delivery]\nconcurrency = 0\n\
                [accounts.\"acct-r\"]\nrate = 0.0\n[accounts.\"acct-x\"]\nplna = \"pro\"\n";
    let config_error = from_text(text, Some("f.toml"), true).unwrap_err();
    let mut problems = config_error.problems.iter();
    for expected in [
        "f.toml:2:15: storage.max_pending: invalid value: integer `-5`, expected u64",
        "f.toml:3:1: storage.max_pendnig: unknown field `max_pendnig`",
        "f.toml:5:8: zoom.plan: unknown variant `platinum`",
        "f.toml:6:17: zoom.client_secret: expected a string, found integer (value not shown",
        "f.toml:8:15: delivery.concurrency: expected between 1 and 10000",
        "f.toml:10:8: accounts.acct-r.rate: expected requests per second",
        "f.toml:12:1: accounts.acct-x.plna: unknown field `plna`",
        "f.toml: zoom.client_id: must be set",
    ] {
        let problem = problems.next().unwrap_or_else(|| panic!("{config_error}"));
        assert!(problem.starts_with(expected), "{problem}\n{config_error}");
    }
    assert!(problems.next().is_none(), "{config_error}");
    assert!(!config_error.to_string().contains("42424242"));
}

#[test]
fn tables_and_sections() {
    for section in SECTIONS {
        Config::parse(&format!("[{section}]\n")).expect(section);
    }
    let message = problems("[nope]\n");
    let listed = SECTIONS
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>();
    assert!(message.ends_with(&listed.join(", ")), "{message}");
    assert_eq!(
        problems("zoom = \"hunter2\"\naccounts = { a = 1 }\n"),
        "1:8: zoom: expected a table, found string\n\
         2:18: accounts.a: expected a table, found integer"
    );
}

#[test]
fn which_keys_are_secret() {
    for key in [
        "zoom.client_secret",
        "zoom.client_secret_file",
        "storage.client_secret",
        "cluster.nats_password",
        "cluster.nkey_seed",
        "cluster.tls.private_key",
        "secrets.anything",
        "zoom.auth_token",
    ] {
        assert!(is_secret_key(&key.split('.').collect::<Vec<_>>()), "{key}");
    }
    // None of the other keys of the example file, which has every key.
    let example = include_str!("../../deploy/zoomq.example.toml").replace("\n#", "\n");
    let keys: Vec<String> = scan(&example)
        .into_iter()
        .filter(|line| line.secret)
        .filter_map(|line| line.key.map(|key| dotted(&key)))
        .collect();
    assert_eq!(
        keys,
        [
            "zoom.client_secret",
            "zoom.client_secret_file",
            "nats.credentials_file",
            "nats.tls_key_file"
        ]
    );
    assert!(!is_secret_key(&["accounts", "turnkey", "plan"]));
}

#[test]
fn output_is_scrubbed_of_secret_values() {
    let text = "[zoom]\nclient_secret = \"hunter2-raw\\u0021\"\n\
                [x]\napi_key = { id = \"keyid\", value = [\"hunter3\"] }\n";
    let mut report = Report::new(None, text);
    let doc = DeTable::parse(text).unwrap().into_inner();
    report.add_secret_values(&mut Vec::new(), &doc);
    let problem = Problem::new(
        "zoom.client_secret",
        "hunter2-raw\\u0021 hunter2-raw! keyid hunter3 value id",
    );
    assert_eq!(
        report.error(vec![problem]).to_string(),
        "zoom.client_secret: <redacted> <redacted> <redacted> <redacted> value id"
    );
}

/// The example file shows every default; uncommenting its `#key = value` lines must give
/// exactly `Config::default()`, so the two cannot drift apart.
#[test]
fn example_file_shows_the_defaults() {
    let example = include_str!("../../deploy/zoomq.example.toml");
    let parsed = Config::parse(example).expect("example parses");
    assert_eq!(parsed.zoom.client_id, "your-client-id");
    let uncommented: String = example
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
            _ => line,
        })
        .filter(|line| {
            !line.starts_with("[accounts")
                && !line.starts_with("plan = \"business\"")
                && !line.starts_with("rate = ")
        })
        .filter(|line| !line.starts_with("client_secret"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut all = Config::parse(&uncommented).expect("uncommented example parses");
    all.zoom.client_id.clear();
    assert_eq!(format!("{all:?}"), format!("{:?}", Config::default()));
}

#[test]
fn account_overrides() {
    let config = Config::parse(
        "[zoom]\nplan = \"free\"\n[accounts.\"acct-b\"]\nplan = \"business\"\n[accounts.\"acct-r\"]\nrate = 7.5\n",
    )
    .unwrap();
    assert_eq!(config.account_limit("acct-r"), 7.5);
    assert_eq!(
        config.account_rate("acct-r"),
        7.5 * config.delivery.rate_margin
    );
    assert_eq!(config.account_limit("acct-b"), 60.0);
    assert!(config.account_rate("acct-b") > 55.0 && config.account_rate("acct-b") <= 60.0);
    assert_eq!(config.account_daily_limit("other"), Some(2000));
    assert_eq!(config.account_daily_limit("acct-b"), None);
}

#[test]
fn nats_backend_and_its_table() {
    let config = Config::parse("").unwrap();
    assert_eq!(config.storage.backend, Backend::Sled);
    let message = problems("[storage]\nbackend = \"nats\"\n");
    assert!(
        message.contains("nats.servers") && message.contains("needs"),
        "{message}"
    );
    let message = problems("[storage]\nbackend = \"redis\"\n");
    assert!(
        message.contains("storage.backend") && message.contains("redis"),
        "{message}"
    );
    let text = "[storage]\nbackend = \"nats\"\n[nats]\n\
                servers = [\"nats://127.0.0.1:4222\", \"http://x:1\", \"nats://u:hunter2@h\"]\n\
                prefix = \"a.b\"\nreplicas = 7\nlease_ttl = \"1s\"\ntls_cert_file = \"/c\"\n\
                credentials_file = \"/etc/hunter3/creds\"\n";
    let message = problems(text);
    for key in [
        "nats.servers: expected a server URL",
        "nats.servers: expected host:port",
        "nats.prefix",
        "nats.replicas",
        "nats.lease_ttl",
        "nats.tls_key_file: set both",
        "nats.tls_cert_file: cannot read /c",
        "nats.credentials_file: cannot read the file it names",
    ] {
        assert!(message.contains(key), "{key} missing from {message}");
    }
    assert!(!message.contains("hunter"), "{message}");
    assert_eq!(
        nats::shown_server("nats://u:hunter2@h:4222"),
        "nats://<user>@h:4222"
    );
    let good = "[zoom]\nclient_id = \"c\"\nclient_secret = \"s\"\n[storage]\nbackend = \"nats\"\n\
                [nats]\nservers = [\"nats://10.0.0.1:4222\", \"tls://h:4443\"]\nreplicas = 1\n";
    assert_eq!(problems(good), "");
    let config = Config::parse(good).unwrap();
    assert!(config.nats.wants_tls());
    assert_eq!(config.nats.lease_ttl, Duration::from_secs(5));
}

/// The cluster example is a valid configuration (given a secret) for the nats backend.
#[test]
fn cluster_example_is_valid() {
    let mut config = Config::parse(include_str!("../../deploy/cluster/zoomq.toml")).unwrap();
    config.set_client_secret("s");
    config.validate().unwrap();
    assert_eq!(config.storage.backend, Backend::Nats);
    assert_eq!(config.nats.servers.len(), 3);
}
