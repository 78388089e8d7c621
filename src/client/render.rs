//! Human renderings of the answers of `zoomq stats`, `zoomq dead list` and `zoomq status` (the
//! JSON forms are printed as they come with `--json`).

use serde_json::Value;

/// Renders a `stats` answer for people.
pub fn format_stats(stats: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: &Value| {
        out.push_str(&format!("{label:<24} {}\n", render(value)));
    };
    for (label, key) in [
        ("pending", "pending"),
        ("in flight", "in_flight"),
        ("dead letters", "dead"),
        ("accounts with work", "accounts"),
        ("oldest pending (s)", "oldest_pending_seconds"),
        ("accepted", "accepted"),
        ("coalesced", "coalesced"),
        ("superseded", "superseded"),
        ("delivered", "delivered"),
        ("retries", "retries"),
        ("answered 429", "rate_limited"),
        ("dead-lettered", "dead_lettered"),
        ("accounts paused", "accounts_paused"),
        ("allowed rate (req/s)", "limiter_rate"),
        ("delivered rate (req/s)", "delivered_rate"),
        ("producer connections", "connections"),
    ] {
        line(&mut out, label, &stats[key]);
    }
    if let Some(rows) = stats["per_account"].as_array() {
        out.push_str(&format_accounts(rows));
    }
    if stats["cluster"].is_object() {
        out.push_str(&format_cluster(&stats["cluster"]));
    }
    if stats["recovering"] == true {
        out.push_str("RECOVERING               stored edits are still being read back; new edits are accepted and sent once it is done\n");
    }
    if let Some(error) = stats["storage_error"].as_str() {
        out.push_str(&format!("STORAGE ERROR            {error}\n"));
    }
    if let Some(error) = stats["token_error"].as_str() {
        out.push_str(&format!("TOKEN ERROR              {error}\n"));
    }
    out
}

/// The cluster mode's part of `stats`: the daemons, and what this one paces (the counts above
/// are the whole deployment's).
fn format_cluster(cluster: &Value) -> String {
    let count = |v: &Value| v.as_array().map_or(0, Vec::len);
    let text = |v: &Value| v.as_str().map_or_else(|| render(v), str::to_string);
    let mut out = format!(
        "\ncluster: this daemon is {} and paces {} of 32 partitions, {} accounts; its share: {} pending, {} in flight, {} dead\n{:<32} {:>10} {:>8} {:>9}\n",
        text(&cluster["daemon"]),
        count(&cluster["partitions"]),
        count(&cluster["accounts_paced"]),
        render(&cluster["this_daemon"]["pending"]),
        render(&cluster["this_daemon"]["in_flight"]),
        render(&cluster["this_daemon"]["dead"]),
        "DAEMON",
        "PARTITIONS",
        "PENDING",
        "IN FLIGHT"
    );
    for daemon in cluster["daemons"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<32} {:>10} {:>8} {:>9}\n",
            text(&daemon["id"]),
            render(&daemon["partitions"]),
            render(&daemon["pending"]),
            render(&daemon["in_flight"])
        ));
    }
    out
}

/// The per-account table of `stats`: rates in requests per second, "quota used" is the
/// delivered rate as a share of the account's limit.
fn format_accounts(rows: &[Value]) -> String {
    if rows.is_empty() {
        return "\nper account: no account active (or metrics.per_account_series = 0)\n".into();
    }
    let mut out = format!(
        "\nper account (largest backlogs, then busiest; rates in requests/s):\n{:<24} {:>8} {:>7} {:>8} {:>10} {:>11}  {}\n",
        "ACCOUNT", "PENDING", "LIMIT", "ALLOWED", "DELIVERED", "QUOTA USED", "PAUSED"
    );
    for row in rows {
        let rate = |key: &str| row[key].as_f64();
        let shown = |value: Option<f64>| value.map_or("-".to_string(), one_decimal);
        let quota = match (rate("delivered"), rate("limit")) {
            (Some(delivered), Some(limit)) if limit > 0.0 => {
                format!("{:.1}%", 100.0 * delivered / limit)
            }
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<24} {:>8} {:>7} {:>8} {:>10} {:>11}  {}\n",
            row["account_id"].as_str().unwrap_or("?"),
            render(&row["pending"]),
            shown(rate("limit")),
            shown(rate("allowed")),
            shown(rate("delivered")),
            quota,
            if row["paused"] == true { "yes" } else { "no" },
        ));
    }
    out
}

/// One decimal, and "0.0" rather than "-0.0" for a value that rounds to zero.
fn one_decimal(value: f64) -> String {
    let value = if value.abs() < 0.05 { 0.0 } else { value };
    format!("{value:.1}")
}

fn render(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Number(n) if n.is_f64() => one_decimal(n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// Renders a `dead_list` answer for people.
pub fn format_dead_list(answer: &Value) -> String {
    let Some(dead) = answer["dead"].as_array() else {
        return "no dead letters\n".into();
    };
    if dead.is_empty() {
        return "no dead letters\n".into();
    }
    let mut out = format!(
        "{:<10} {:<28} {:<20} {:<15} {:>6} {:>6}  {}\n",
        "JOB", "MESSAGE", "ACCOUNT", "REASON", "STATUS", "CODE", "DETAIL"
    );
    for d in dead {
        // A message named by a ref shows its ref (it may have no id yet).
        let message = match (d["ref"].as_str(), d["message_id"].as_str()) {
            (Some(reference), _) => format!("ref:{reference}"),
            (None, Some(id)) => id.to_string(),
            (None, None) => "?".to_string(),
        };
        out.push_str(&format!(
            "{:<10} {:<28} {:<20} {:<15} {:>6} {:>6}  {}\n",
            d["job_id"].as_str().unwrap_or("?"),
            message,
            d["account_id"].as_str().unwrap_or("?"),
            d["reason"].as_str().unwrap_or("?"),
            render(&d["status"]),
            render(&d["zoom_code"]),
            d["detail"].as_str().unwrap_or(""),
        ));
    }
    out
}

/// Renders a `status` answer for people, one line: the state, then the fields the answer has as
/// `key=value`, e.g. `sent  message_id=m1 sent_time="2019-10-17 01:40:24 +0000"`.
pub fn format_status(answer: &Value) -> String {
    let mut out = answer["state"].as_str().unwrap_or("?").to_string();
    let mut separator = "  ";
    for key in ["message_id", "sent_time", "reason", "job_id", "ref"] {
        let Some(value) = answer[key].as_str() else {
            continue;
        };
        out.push_str(&format!("{separator}{key}={}", quoted_if_needed(value)));
        separator = " ";
    }
    out.push('\n');
    out
}

/// A value as is when it reads back unambiguously in a `key=value` line (Zoom's `sent_time`
/// has spaces, a ref may have anything), else quoted with Rust's escapes.
fn quoted_if_needed(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\' || c == '=');
    if plain {
        value.to_string()
    } else {
        format!("{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stats_answer() -> Value {
        json!({"ok": true, "pending": 9, "in_flight": 1, "dead": 0, "accounts": 2,
        "oldest_pending_seconds": 0.4, "accepted": 1200, "coalesced": 1100,
        "superseded": 3, "delivered": 97, "retries": 4, "rate_limited": 1,
        "dead_lettered": 0, "accounts_paused": 1, "limiter_rate": 19.4,
        "delivered_rate": 19.8, "connections": 1, "storage_error": null,
        "token_error": null,
        "per_account": [
            {"account_id": "demo-account", "pending": 9, "limit": 20.0, "allowed": 19.4,
             "delivered": 19.3, "paused": false},
            {"account_id": "acct-free", "pending": 0, "limit": 2.0, "allowed": 0.0,
             "delivered": 0.5, "paused": true},
        ]})
    }

    #[test]
    fn stats_show_every_account_row_with_its_quota_used() {
        let text = format_stats(&stats_answer());
        assert!(text.contains("delivered rate (req/s)   19.8\n"), "{text}");
        let mut paused = stats_answer();
        paused["limiter_rate"] = json!(-0.0);
        let text_paused = format_stats(&paused);
        assert!(
            text_paused.contains("allowed rate (req/s)     0.0\n"),
            "{text_paused}"
        );
        assert!(text.contains("accounts with work       2\n"), "{text}");
        let table: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("ACCOUNT"))
            .collect();
        assert_eq!(
            table,
            [
                "ACCOUNT                   PENDING   LIMIT  ALLOWED  DELIVERED  QUOTA USED  PAUSED",
                "demo-account                    9    20.0     19.4       19.3       96.5%  no",
                "acct-free                       0     2.0      0.0        0.5       25.0%  yes",
            ]
        );
    }

    #[test]
    fn stats_show_the_cluster() {
        let mut answer = stats_answer();
        answer["cluster"] = json!({"daemon": "host-a-1f", "partitions": [0, 3, 9],
            "accounts_paced": ["acct-1", "acct-2"],
            "this_daemon": {"pending": 4, "in_flight": 1, "dead": 0},
            "daemons": [{"id": "host-a-1f", "host": "host-a", "partitions": 3, "pending": 4, "in_flight": 1},
                        {"id": "host-b-2e", "host": "host-b", "partitions": 29, "pending": 5, "in_flight": 0}]});
        let text = format_stats(&answer);
        assert!(
            text.contains("cluster: this daemon is host-a-1f and paces 3 of 32 partitions, 2 accounts; its share: 4 pending, 1 in flight, 0 dead\n"),
            "{text}"
        );
        assert!(
            text.contains("host-b-2e                                29        5         0\n"),
            "{text}"
        );
    }

    #[test]
    fn stats_without_rows_say_why() {
        let mut answer = stats_answer();
        answer["per_account"] = json!([]);
        assert!(format_stats(&answer).contains("no account active"));
        // An older daemon without the field: no table at all.
        answer.as_object_mut().unwrap().remove("per_account");
        assert!(!format_stats(&answer).contains("per account"));
    }

    #[test]
    fn status_is_one_line_with_the_fields_present() {
        let answer = json!({"ok": true, "state": "sent", "message_id": "20191017014024747_XYYRFjM_main",
            "sent_time": "2019-10-17 01:40:24 +0000"});
        assert_eq!(
            format_status(&answer),
            "sent  message_id=20191017014024747_XYYRFjM_main sent_time=\"2019-10-17 01:40:24 +0000\"\n"
        );
        let answer = json!({"ok": true, "state": "dead", "reason": "outcome_unknown",
            "job_id": "17", "ref": "build 42"});
        assert_eq!(
            format_status(&answer),
            "dead  reason=outcome_unknown job_id=17 ref=\"build 42\"\n"
        );
        assert_eq!(
            format_status(&json!({"ok": true, "state": "pending"})),
            "pending\n"
        );
    }

    #[test]
    fn status_values_that_would_break_the_line_are_quoted() {
        let answer = json!({"ok": true, "state": "in_flight", "ref": "a=b\"c\nd"});
        assert_eq!(format_status(&answer), "in_flight  ref=\"a=b\\\"c\\nd\"\n");
        // A state this client does not know yet is shown, not refused.
        assert_eq!(
            format_status(&json!({"ok": true, "state": "archived"})),
            "archived\n"
        );
    }

    #[test]
    fn status_renders_the_daemons_own_answer() {
        use crate::protocol::{status_line, MessageState, MessageStatus};
        let line = status_line(&MessageStatus {
            state: MessageState::Deleted,
            message_id: Some("m1".into()),
            sent_time: None,
            reason: None,
            job_id: None,
            reference: Some("r1".into()),
        });
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(format_status(&answer), "deleted  message_id=m1 ref=r1\n");
    }
}
