//! `lifecycle`: one account whose messages live their whole life through zoomq, named by the
//! bot's own refs. Each ref is sent, edited in bursts far faster than the account's limit (so
//! the edits coalesce), and one in three is deleted; enough refs are under way at once that the
//! account always has a backlog of sends, edits and deletes mixed. Zoom counts the three calls
//! against one per-account quota, so together they must keep to the limit, and at the end every
//! ref must be exactly one message at Zoom showing its last edit, or deleted. Per plan (Pro,
//! Business), each row its own sandbox and daemon.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zoomq::plan::Plan;
use zoomq::sandbox::SandboxConfig;

use crate::measure::{self, ms, secs, Arrival, Counts, Log, Rate, WindowMax};
use crate::report::{loadavg, print_targets, Target};
use crate::rig::{self, content_seq, seq_content, Conn, Rig, ACCOUNT, ROBOT};
use crate::Args;

/// The share of the limit the three calls together must be delivered at. Lower than the
/// `drain` rows' 99 %: a life has waits an edit has not (a send leaves only once its in-doubt
/// mark is committed; a ref's first edit, only once the send's id is).
const TARGET_SHARE: f64 = 0.95;
/// Refs under way at once, per request a second of the limit: each waits about this many
/// seconds in line per step, so the line never empties while producers react to answers.
const REFS_PER_LIMIT: u32 = 3;
/// Bursts of edits per ref, each sent once the previous one has reached Zoom.
const ROUNDS: u32 = 3;
/// Edits in one burst, pipelined: all but about one coalesce.
const BURST: u64 = 20;
/// Every third ref is deleted right after its last burst, so the delete replaces that edit.
const DELETE_EVERY: usize = 3;
/// How often a producer asks whether its edits have reached Zoom.
const POLL: Duration = Duration::from_millis(200);
/// How long one step of a ref may take before the benchmark calls the daemon stuck.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const TO_JID: &str = "bench-channel@conference.xmpp.zoom.us";

/// What a producer did with one ref.
#[derive(Debug)]
struct Life {
    reference: String,
    /// The sequence number of the last content acknowledged (0: the send's).
    last_seq: u64,
    deleted: bool,
}

/// One call's requests and 2xx answers in the steady part.
#[derive(Debug, Serialize)]
struct Call {
    requests: u64,
    delivered: u64,
    /// Delivered per second of the steady part.
    per_second: f64,
    /// Mean gaps, in ms, from the request before to this call's requests and from them to the
    /// request after (of any call), in the steady part: requests that reach Zoom `d` later
    /// than their slot show `d` more before and `d` less after.
    gap_before_ms: f64,
    gap_after_ms: f64,
    /// This call's requests in the steady part that the next request followed within half the
    /// limit's spacing: the late ones.
    crowded: usize,
}

/// What the sandbox holds at the end, checked against what the producers did.
#[derive(Debug, Default, Serialize)]
struct EndState {
    refs: usize,
    deleted: usize,
    messages: usize,
    /// One line per ref that is not exactly one message with its last content, or deleted.
    wrong: Vec<String>,
    /// Most requests for one message at the same time (must be 1).
    max_concurrent: u32,
}

#[derive(Debug, Serialize)]
struct Row {
    plan: Plan,
    /// The account's capacity as the sandbox enforces it: the anchor.
    limit: u32,
    refs_at_once: u32,
    steady_from_s: f64,
    steady_until_s: f64,
    /// 2xx of the three calls together in the steady part.
    delivered: Rate,
    share_of_limit: f64,
    by_call: BTreeMap<&'static str, Call>,
    /// Over the whole run.
    requests_total: usize,
    rate_limited_total: u64,
    /// Answers other than 2xx and 429 over the whole run (a 404 would mean an edit after a
    /// delete, or a message that never was).
    refused_total: u64,
    windows: WindowMax,
    /// The sandbox's own figures (`AccountStats`), over every counted request.
    sandbox_max_fixed: u32,
    sandbox_max_sliding: u32,
    /// Fewest jobs pending in the steady part, sampled every 100 ms: > 0 means a backlog.
    min_pending: u64,
    edits_acked: u64,
    coalesced: u64,
    /// From the producers' stop until nothing was pending or in flight.
    wind_down_s: f64,
    end: EndState,
}

pub async fn lifecycle(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(60.0);
    let edge = args.edge;
    let plans = [Plan::Pro, Plan::Business];
    println!(
        "\n== lifecycle: one account, refs sent, edited {ROUNDS} x {BURST} times, one in {DELETE_EVERY} deleted, {REFS_PER_LIMIT} x limit refs under way; {seconds} s measured between the first and last {edge} s; rows {}",
        if args.serial { "one after another" } else { "at once (a sandbox and a daemon each)" }
    );
    let rows = rig::rows(&plans, args.serial, |plan| row(plan, seconds, edge)).await?;

    println!(
        "row       limit  deliv/s % limit  send/s  edit/s   del/s  429 other  fixed/wall/phase/sl zoom f/sl min pend    refs/del wrong"
    );
    let mut targets = Vec::new();
    for r in &rows {
        let w = r.windows;
        let call = |op: &str| r.by_call.get(op).map_or(0.0, |c| c.per_second);
        println!(
            "{:<9} {:>5} {:>8.3} {:>6.2}% {:>7.3} {:>7.3} {:>7.3} {:>4} {:>5} {:>20} {:>9} {:>8} {:>11} {:>5}",
            r.plan.to_string(),
            r.limit,
            r.delivered.per_second,
            r.share_of_limit * 100.0,
            call("send"),
            call("edit"),
            call("delete"),
            r.rate_limited_total,
            r.refused_total,
            format!("{}/{}/{}/{}", w.sandbox_fixed, w.wall_fixed, w.any_phase_fixed, w.sliding),
            format!("{}/{}", r.sandbox_max_fixed, r.sandbox_max_sliding),
            r.min_pending,
            format!("{}/{}", r.end.refs, r.end.deleted),
            r.end.wrong.len(),
        );
        targets.extend(row_targets(r));
    }
    for r in &rows {
        println!(
            "{}: {} edits acked, {} coalesced; {} messages at Zoom; wound down in {:.2} s",
            r.plan, r.edits_acked, r.coalesced, r.end.messages, r.wind_down_s
        );
        println!(
            "{}: mean gap before / after a request in ms (the limit's spacing: {:.2}), and how many the next followed within half a spacing: {}",
            r.plan,
            1000.0 / f64::from(r.limit),
            r.by_call
                .iter()
                .map(|(op, c)| format!(
                    "{op} {:.2} / {:.2}, {} of {}",
                    c.gap_before_ms, c.gap_after_ms, c.crowded, c.requests
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for line in r.end.wrong.iter().take(10) {
            println!("  WRONG {line}");
        }
    }
    println!(
        "(deliv/s: (n - 1) / (last - first) of the n 2xx of all three calls in the steady part; send/s, edit/s, del/s: 2xx of each / steady seconds; 429, other and windows over the whole run; zoom f/sl: the sandbox's own most in a fixed / sliding 1 s window; min pend: fewest pending jobs sampled in the steady part)"
    );
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "lifecycle", "machine": machine, "loadavg": loadavg(),
        "seconds": seconds, "edge_seconds": edge, "serial": args.serial,
        "rounds": ROUNDS, "burst": BURST, "delete_every": DELETE_EVERY, "rows": rows,
        "targets": targets,
    });
    println!("{line}");
    Ok(())
}

fn row_targets(r: &Row) -> Vec<Target> {
    let w = r.windows;
    let worst = w
        .worst()
        .max(r.sandbox_max_fixed)
        .max(r.sandbox_max_sliding);
    vec![
        Target::new(
            format!("{}: send + edit + delete delivered / limit over the steady part, with a backlog", r.plan),
            format!(">= {:.0}%, > 0 pending throughout", TARGET_SHARE * 100.0),
            format!(
                "{:.2}% ({:.3}/s of {}/s, {} in {:.1} s); fewest pending {}",
                r.share_of_limit * 100.0,
                r.delivered.per_second,
                r.limit,
                r.delivered.count,
                r.steady_until_s - r.steady_from_s,
                r.min_pending
            ),
            r.share_of_limit >= TARGET_SHARE && r.min_pending > 0,
        ),
        Target::new(
            format!("{}: requests answered 429", r.plan),
            "0",
            format!("{} of {}", r.rate_limited_total, r.requests_total),
            r.rate_limited_total == 0,
        ),
        Target::new(
            format!(
                "{}: most requests in a 1 s window (sandbox-fixed / wall-clock / any phase / sliding; the sandbox's own fixed / sliding)",
                r.plan
            ),
            format!("<= {}", r.limit),
            format!(
                "{} / {} / {} / {}; {} / {}",
                w.sandbox_fixed,
                w.wall_fixed,
                w.any_phase_fixed,
                w.sliding,
                r.sandbox_max_fixed,
                r.sandbox_max_sliding
            ),
            worst <= r.limit,
        ),
        Target::new(
            format!(
                "{}: end state (one message per ref, last edit or deleted; no refused request; one request per message at a time)",
                r.plan
            ),
            format!("all {} refs, 0 refused, 1", r.end.refs),
            format!(
                "{} of {} ({} deleted), {} refused, {}",
                r.end.refs - r.end.wrong.len(),
                r.end.refs,
                r.end.deleted,
                r.refused_total,
                r.end.max_concurrent
            ),
            r.end.wrong.is_empty() && r.refused_total == 0 && r.end.max_concurrent <= 1,
        ),
    ]
}

async fn row(plan: Plan, seconds: f64, edge: f64) -> anyhow::Result<Row> {
    let sandbox = SandboxConfig {
        default_plan: plan,
        ..SandboxConfig::default()
    };
    let rig = Rig::start(sandbox, |_| {}).await?;
    let refs_at_once = REFS_PER_LIMIT * plan.per_second();
    let stop = CancellationToken::new();
    let producing = tokio::spawn(produce(rig.socket.clone(), refs_at_once, stop.clone()));
    // Stops the producers also when measuring fails, so the task cannot outlive the rig.
    let _stop = stop.clone().drop_guard();

    let first = rig.first_request(ACCOUNT).await?;
    let (steady_from, steady_until) = (first + secs(edge), first + secs(edge + seconds));
    tokio::time::sleep_until(steady_from.into()).await;
    let mut min_pending = u64::MAX;
    while Instant::now() < steady_until && !producing.is_finished() {
        let pending = rig.stats().await?["pending"].as_u64().unwrap_or(0);
        min_pending = min_pending.min(pending);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(
        min_pending != u64::MAX,
        "the producers ended before the steady part"
    );
    tokio::time::sleep_until((steady_until + secs(edge)).into()).await;
    stop.cancel();
    let stopped = Instant::now();
    let lives = producing.await??;
    rig.wait_drained(STEP_TIMEOUT).await?;
    let wind_down = stopped.elapsed();

    let stats = rig.stats().await?;
    let log = Log::read(&rig.sandbox);
    let account = rig.account(ACCOUNT)?;
    let end = end_state(&lives, &rig.sandbox.messages());
    rig.stop().await?;

    let arrivals = log.arrivals(ACCOUNT);
    let (from, until) = (log.offset(steady_from), log.offset(steady_until));
    let steady_seconds = (until - from).as_secs_f64();
    let delivered = measure::rate(&measure::delivered(arrivals), from, until);
    let mut by_call = BTreeMap::new();
    for op in ["send", "edit", "delete"] {
        let of_op: Vec<_> = arrivals.iter().filter(|a| a.op == op).copied().collect();
        let counts = Counts::of(&of_op, from, until);
        let steady = |a: &Arrival| a.op == op && a.offset >= from && a.offset < until;
        let gap = |w: &[Arrival]| w[1].offset - w[0].offset;
        let before = mean(arrivals.windows(2).filter(|w| steady(&w[1])).map(gap));
        let after: Vec<Duration> = arrivals
            .windows(2)
            .filter(|w| steady(&w[0]))
            .map(gap)
            .collect();
        let spacing = Duration::from_secs(1) / account.capacity_per_second;
        by_call.insert(
            op,
            Call {
                requests: counts.requests,
                delivered: counts.delivered,
                per_second: counts.delivered as f64 / steady_seconds,
                gap_before_ms: before,
                gap_after_ms: mean(after.iter().copied()),
                crowded: after.iter().filter(|g| **g < spacing / 2).count(),
            },
        );
    }
    let whole = Counts::of(arrivals, Duration::ZERO, Duration::MAX);

    Ok(Row {
        plan,
        limit: account.capacity_per_second,
        refs_at_once,
        steady_from_s: from.as_secs_f64(),
        steady_until_s: until.as_secs_f64(),
        share_of_limit: delivered.per_second / f64::from(account.capacity_per_second),
        delivered,
        by_call,
        requests_total: arrivals.len(),
        rate_limited_total: whole.rate_limited,
        refused_total: whole.requests - whole.delivered - whole.rate_limited,
        windows: WindowMax::of(&measure::offsets(arrivals), log.wall_phase),
        sandbox_max_fixed: account.max_fixed_window,
        sandbox_max_sliding: account.max_sliding_window,
        min_pending,
        edits_acked: lives.iter().map(|l| l.last_seq).sum(),
        coalesced: stats["coalesced"].as_u64().unwrap_or(0),
        wind_down_s: wind_down.as_secs_f64(),
        end,
    })
}

/// Keeps `at_once` refs under way, a new one as soon as one is done, until `stop`; then lets
/// those under way end their lives (the rest of their bursts skipped) and returns every life.
async fn produce(
    socket: PathBuf,
    at_once: u32,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Life>> {
    let mut under_way = JoinSet::new();
    let mut next = 0;
    let mut lives = Vec::new();
    loop {
        while under_way.len() < at_once as usize && !stop.is_cancelled() {
            under_way.spawn(life(socket.clone(), next, stop.clone()));
            next += 1;
        }
        let Some(done) = under_way.join_next().await else {
            return Ok(lives);
        };
        lives.push(done??);
    }
}

/// One ref's life as a bot showing progress lives it: send, wait for Zoom's id, then bursts of
/// edits, each once the previous one has reached Zoom, and maybe a delete.
async fn life(socket: PathBuf, index: usize, stop: CancellationToken) -> anyhow::Result<Life> {
    let reference = format!("life-{index}");
    let deleted = index % DELETE_EVERY == DELETE_EVERY - 1;
    let mut conn = Conn::connect(&socket).await?;
    conn.call(&json!({
        "op": "send", "ref": reference, "account_id": ACCOUNT, "robot_jid": ROBOT,
        "to_jid": TO_JID, "content": seq_content(&reference, 0),
    }))
    .await?;
    // Edits sent before Zoom has the message would only coalesce into the send.
    wait_for(&mut conn, &reference, |status| {
        !status["message_id"].is_null()
    })
    .await?;
    let mut seq = 0;
    for round in 0..ROUNDS {
        if round > 0 && stop.is_cancelled() {
            break;
        }
        let edits: Vec<Value> = (seq + 1..=seq + BURST)
            .map(|s| {
                json!({
                    "op": "edit", "ref": reference, "account_id": ACCOUNT, "robot_jid": ROBOT,
                    "content": seq_content(&reference, s),
                })
            })
            .collect();
        conn.pipeline(&edits).await?;
        seq += BURST;
        let last = round + 1 == ROUNDS || stop.is_cancelled();
        if !(deleted && last) {
            wait_for(&mut conn, &reference, |status| status["state"] == "sent").await?;
        }
    }
    if deleted {
        conn.call(&json!({
            "op": "delete", "ref": reference, "account_id": ACCOUNT, "robot_jid": ROBOT,
        }))
        .await?;
    }
    Ok(Life {
        reference,
        last_seq: seq,
        deleted,
    })
}

/// Asks `status` (holding each question up to 10 s, which answers as soon as the message has
/// Zoom's id) until `done` says so, every `POLL` while it does not.
async fn wait_for(
    conn: &mut Conn,
    reference: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let status = conn
            .call(&json!({
                "op": "status", "ref": reference, "account_id": ACCOUNT, "robot_jid": ROBOT,
                "wait": "10s",
            }))
            .await?;
        if done(&status) {
            return Ok(());
        }
        anyhow::ensure!(
            !matches!(status["state"].as_str(), Some("dead" | "deleted")),
            "{reference} ended unexpectedly: {status}"
        );
        anyhow::ensure!(Instant::now() < deadline, "{reference} stuck: {status}");
        tokio::time::sleep(POLL).await;
    }
}

/// The mean of `gaps`, in ms.
fn mean(gaps: impl Iterator<Item = Duration>) -> f64 {
    let (sum, count) = gaps.fold((Duration::ZERO, 0), |(sum, count), g| (sum + g, count + 1));
    ms(sum) / f64::from(count.max(1))
}

/// Checks the sandbox's messages against the lives: each ref exactly one message (found by the
/// ref its contents carry), deleted if its life ended in a delete, else showing its last edit.
fn end_state(lives: &[Life], messages: &[zoomq::sandbox::MessageRecord]) -> EndState {
    let mut by_ref: HashMap<&str, Vec<&zoomq::sandbox::MessageRecord>> = HashMap::new();
    let mut end = EndState {
        refs: lives.len(),
        deleted: lives.iter().filter(|l| l.deleted).count(),
        messages: messages.len(),
        ..EndState::default()
    };
    for message in messages {
        end.max_concurrent = end.max_concurrent.max(message.max_concurrent);
        let reference = message
            .content
            .as_ref()
            .and_then(|c| c["head"]["text"].as_str())
            .unwrap_or("");
        by_ref.entry(reference).or_default().push(message);
    }
    for life in lives {
        let found = by_ref.remove(life.reference.as_str()).unwrap_or_default();
        let [message] = found.as_slice() else {
            end.wrong
                .push(format!("{}: {} messages", life.reference, found.len()));
            continue;
        };
        let shown = message.content.as_ref().and_then(content_seq);
        if life.deleted && !message.deleted {
            end.wrong.push(format!("{}: not deleted", life.reference));
        } else if !life.deleted && (message.deleted || shown != Some(life.last_seq)) {
            end.wrong.push(format!(
                "{}: shows {shown:?} (deleted {}), last acked {}",
                life.reference, message.deleted, life.last_seq
            ));
        }
    }
    for (reference, stray) in by_ref {
        end.wrong.push(format!(
            "{} message(s) of no ref {reference:?}",
            stray.len()
        ));
    }
    end
}
