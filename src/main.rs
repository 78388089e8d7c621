//! The `zoomq` command: parses the command line, sets up logging and hands over to the
//! library. Kept thin on purpose; everything testable lives in the library.
#![deny(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use zoomq::config::{Config, DEFAULT_SOCKET_PATH};

#[derive(Parser)]
#[command(
    name = "zoomq",
    version,
    about = "Durable, rate-limited delivery of Zoom chat-bot message edits"
)]
struct Cli {
    /// Log filter, e.g. "info" or "zoomq=debug" (RUST_LOG wins when set) [default: info;
    /// error for `demo`, whose status line would drown in log lines].
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Enqueue one edit through the daemon's socket and print the answer.
    Send(SendArgs),
    /// Print queue and delivery figures.
    Stats {
        #[command(flatten)]
        target: Target,
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file; print every problem.
    CheckConfig { file: PathBuf },
    /// Inspect and manage dead letters.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Run the local Zoom sandbox (a fake Zoom API) for development.
    Sandbox(zoomq::demo::SandboxArgs),
    /// Run the daemon against the built-in sandbox with a demo producer.
    Demo(zoomq::demo::DemoArgs),
}

#[derive(Args)]
struct Target {
    /// The daemon's socket [default: socket.path of --config, else /run/zoomq/zoomq.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Read the socket path from this configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct SendArgs {
    #[arg(long)]
    message_id: String,
    #[arg(long)]
    account_id: String,
    #[arg(long)]
    robot_jid: String,
    /// The message content (a JSON object); read from stdin when neither this nor
    /// --content-file is given.
    #[arg(long, conflicts_with = "content_file")]
    content: Option<String>,
    #[arg(long)]
    content_file: Option<PathBuf>,
    #[arg(long)]
    user_jid: Option<String>,
    /// Set is_markdown_support.
    #[arg(long)]
    markdown: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List dead letters.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        target: Target,
    },
    /// Put dead letters back in the queue.
    Retry {
        #[arg(required_unless_present = "all")]
        job_id: Option<String>,
        #[arg(long, conflicts_with = "job_id")]
        all: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Delete dead letters.
    Purge {
        #[arg(required_unless_present = "all")]
        job_id: Option<String>,
        #[arg(long, conflicts_with = "job_id")]
        all: bool,
        #[command(flatten)]
        target: Target,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // systemd's sockets must be taken before any thread starts (they live in the environment).
    let inherited = match cli.command {
        Command::Serve { .. } => zoomq::systemd::take_inherited_listener(),
        _ => None,
    };
    let default_level = match cli.command {
        Command::Demo(_) => "error",
        _ => "info",
    };
    init_logging(
        cli.log_level.as_deref().unwrap_or(default_level),
        cli.log_format,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("zoomq: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(dispatch(cli.command, inherited)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zoomq: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Dropping a runtime waits for every blocking task, e.g. a DNS lookup of Zoom's host stuck
    // in getaddrinfo (reqwest resolves on the blocking pool). Everything that matters is done
    // by now (`zoomq::run` returns after the queue's last commit), so do not wait long.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}

/// How long the runtime's teardown waits for blocking tasks still running (part of the stop's
/// budget, see `zoomq::SHUTDOWN_GRACE_MAX`).
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(100);

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(
    command: Command,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => {
            let config =
                Config::load(&config).map_err(|e| anyhow!("invalid configuration:\n{e}"))?;
            let socket_path = config.socket.path.clone();
            let (listener, owns_path) = match inherited {
                Some(listener) => (listener, false),
                None => (zoomq::bind_socket(&config.socket)?, true),
            };
            let cancel = CancellationToken::new();
            tokio::spawn(cancel_on_signal(cancel.clone()));
            zoomq::run(config, listener, cancel).await?;
            if owns_path {
                zoomq::remove_socket(&socket_path);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(args) => send(args).await,
        Command::Stats { target, json } => {
            let answer =
                zoomq::client::request(&socket_of(&target)?, &json!({"op": "stats"})).await?;
            if json {
                println!("{answer}");
            } else {
                print!("{}", zoomq::client::format_stats(&answer));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for problem in &e.problems {
                    println!("{problem}");
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Dead { command } => dead(command).await,
        Command::Sandbox(args) => zoomq::demo::run_sandbox(args)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => zoomq::demo::run_demo(args).await,
    }
}

/// Cancels on SIGTERM or SIGINT.
async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    cancel.cancel();
}

fn socket_of(target: &Target) -> anyhow::Result<PathBuf> {
    if let Some(socket) = &target.socket {
        return Ok(socket.clone());
    }
    if let Some(path) = &target.config {
        // Only socket.path is needed, but the file is checked (and its errors made safe) as by
        // `serve`; values are not validated and the secret is not looked for.
        let config =
            Config::load_unvalidated(path).map_err(|e| anyhow!("invalid configuration:\n{e}"))?;
        return Ok(config.socket.path);
    }
    Ok(PathBuf::from(DEFAULT_SOCKET_PATH))
}

async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let content_text = match (&args.content, &args.content_file) {
        (Some(content), _) => content.clone(),
        (None, Some(path)) => read_file(path)?,
        (None, None) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the content from stdin")?;
            text
        }
    };
    let content: serde_json::Value =
        serde_json::from_str(&content_text).context("the content is not valid JSON")?;
    let mut request = json!({
        "op": "edit",
        "message_id": args.message_id,
        "account_id": args.account_id,
        "robot_jid": args.robot_jid,
        "content": content,
    });
    if let Some(user_jid) = args.user_jid {
        request["user_jid"] = json!(user_jid);
    }
    if args.markdown {
        request["is_markdown_support"] = json!(true);
    }
    let answer = zoomq::client::request(&socket_of(&args.target)?, &request).await?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

async fn dead(command: DeadCommand) -> anyhow::Result<ExitCode> {
    let with_selector = |op: &str, job_id: Option<String>, all: bool| {
        if all {
            json!({"op": op, "all": true})
        } else {
            json!({"op": op, "job_id": job_id})
        }
    };
    match command {
        DeadCommand::List {
            json,
            limit,
            target,
        } => {
            let mut request = json!({"op": "dead_list"});
            if let Some(limit) = limit {
                request["limit"] = json!(limit);
            }
            let answer = zoomq::client::request(&socket_of(&target)?, &request).await?;
            if json {
                println!("{answer}");
            } else {
                print!("{}", zoomq::client::format_dead_list(&answer));
            }
        }
        DeadCommand::Retry {
            job_id,
            all,
            target,
        } => {
            let request = with_selector("dead_retry", job_id, all);
            let answer = zoomq::client::request(&socket_of(&target)?, &request).await?;
            println!(
                "retried {}, superseded by newer edits {}",
                answer["retried"], answer["superseded"]
            );
        }
        DeadCommand::Purge {
            job_id,
            all,
            target,
        } => {
            let request = with_selector("dead_purge", job_id, all);
            let answer = zoomq::client::request(&socket_of(&target)?, &request).await?;
            println!("purged {}", answer["purged"]);
        }
    }
    Ok(ExitCode::SUCCESS)
}
