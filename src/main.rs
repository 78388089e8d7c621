//! The `zoomq` command: parses the command line, sets up logging and hands over to the
//! library. Kept thin on purpose; everything testable lives in the library.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use zoomq::client::{self, Body, Content, Message, Recipient};
use zoomq::config::{Config, DEFAULT_SOCKET_PATH};
use zoomq::protocol::Target as MessageTarget;

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
    /// Send a new message named by your own ref and print the answer.
    ///
    /// A ref already known never makes a second message: it updates the one it names.
    Post(PostArgs),
    /// Edit a message, named by its ref or by Zoom's message_id, and print the answer.
    Edit(EditArgs),
    /// Delete a message (or cancel its send if not yet attempted) and print the answer.
    Delete(DeleteArgs),
    /// Print where a message stands: pending, in_flight, sent, deleted or dead.
    Status(StatusArgs),
    /// Enqueue one edit by --message-id and print the answer (the old name of `edit`).
    ///
    /// `edit` is the new name and also takes --ref; `send` stays for existing scripts. It is not
    /// the protocol's "send" op: that is `post`.
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

/// How a command names an existing message: exactly one of --ref and --message-id.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct MessageName {
    /// The bot's own name for the message, as given to `post`.
    #[arg(long = "ref", value_name = "REF")]
    reference: Option<String>,
    /// Zoom's id of the message.
    #[arg(long)]
    message_id: Option<String>,
}

#[derive(Args)]
struct MessageArgs {
    #[command(flatten)]
    name: MessageName,
    #[arg(long)]
    account_id: String,
    #[arg(long)]
    robot_jid: String,
}

impl MessageArgs {
    fn message(self) -> Message {
        let target = match (self.name.reference, self.name.message_id) {
            (Some(reference), _) => MessageTarget::Ref(reference),
            // clap requires one of the two.
            (None, message_id) => MessageTarget::MessageId(message_id.unwrap_or_default()),
        };
        Message {
            target,
            account_id: self.account_id,
            robot_jid: self.robot_jid,
        }
    }
}

/// What a post or an edit carries.
#[derive(Args)]
struct BodyArgs {
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
}

impl BodyArgs {
    fn body(self) -> Body {
        Body {
            content: Content::from_flags(self.content, self.content_file),
            user_jid: self.user_jid,
            markdown: self.markdown,
        }
    }
}

#[derive(Args)]
struct PostArgs {
    /// Your name for the message (unique per account and bot), used to edit, delete or ask
    /// about it later.
    #[arg(long = "ref", value_name = "REF")]
    reference: String,
    #[arg(long)]
    account_id: String,
    #[arg(long)]
    robot_jid: String,
    /// The channel's or user's JID.
    #[arg(long)]
    to_jid: String,
    /// Only this user sees the message.
    #[arg(long)]
    visible_to_user: Option<String>,
    /// Post as a threaded reply to this message id.
    #[arg(long)]
    reply_to: Option<String>,
    #[command(flatten)]
    body: BodyArgs,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct EditArgs {
    #[command(flatten)]
    message: MessageArgs,
    #[command(flatten)]
    body: BodyArgs,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct DeleteArgs {
    #[command(flatten)]
    message: MessageArgs,
    #[arg(long)]
    user_jid: Option<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    message: MessageArgs,
    /// Wait up to this long (e.g. "10s") for a message_id or a final state; the daemon caps it.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct SendArgs {
    #[arg(long)]
    message_id: String,
    #[arg(long)]
    account_id: String,
    #[arg(long)]
    robot_jid: String,
    #[command(flatten)]
    body: BodyArgs,
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
        Command::Post(args) => {
            let message = Message {
                target: MessageTarget::Ref(args.reference),
                account_id: args.account_id,
                robot_jid: args.robot_jid,
            };
            let recipient = Recipient {
                to_jid: args.to_jid,
                visible_to_user: args.visible_to_user,
                reply_to: args.reply_to,
            };
            let socket = socket_of(&args.target)?;
            client::post(&socket, &message, &recipient, &args.body.body()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Edit(args) => {
            let socket = socket_of(&args.target)?;
            client::edit(&socket, &args.message.message(), &args.body.body()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(args) => {
            let message = Message {
                target: MessageTarget::MessageId(args.message_id),
                account_id: args.account_id,
                robot_jid: args.robot_jid,
            };
            client::edit(&socket_of(&args.target)?, &message, &args.body.body()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete(args) => {
            let socket = socket_of(&args.target)?;
            client::delete(&socket, &args.message.message(), args.user_jid.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let socket = socket_of(&args.target)?;
            client::status(&socket, &args.message.message(), args.wait, args.json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { target, json } => {
            client::stats(&socket_of(&target)?, json).await?;
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
        Command::Dead { command } => {
            match command {
                DeadCommand::List {
                    json,
                    limit,
                    target,
                } => client::dead_list(&socket_of(&target)?, limit, json).await?,
                DeadCommand::Retry {
                    job_id,
                    all,
                    target,
                } => client::dead_retry(&socket_of(&target)?, job_id, all).await?,
                DeadCommand::Purge {
                    job_id,
                    all,
                    target,
                } => client::dead_purge(&socket_of(&target)?, job_id, all).await?,
            }
            Ok(ExitCode::SUCCESS)
        }
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
