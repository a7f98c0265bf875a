//! `parley`: the Parley command line client, and `parley dev`, a local cluster.

mod chat;
mod commands;
mod dev_cluster;
mod profile;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The client endpoints of a cluster started by `parley dev` with its defaults.
const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7102,127.0.0.1:7112,127.0.0.1:7122";

#[derive(Parser)]
#[command(
    name = "parley",
    version,
    about = "Parley command line client and local development cluster"
)]
struct Cli {
    /// Client (WebSocket) endpoints of the cluster, host:port, comma-separated.
    #[arg(long, global = true, env = "PARLEY_ENDPOINT", default_value = DEFAULT_ENDPOINTS)]
    endpoint: String,
    /// Directory holding saved credentials (<user>.json). Default: $HOME/.parley.
    #[arg(long, global = true, env = "PARLEY_HOME")]
    profile_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local cluster of parley-node processes until Ctrl-C.
    Dev(dev_cluster::DevArgs),
    /// Register a new user with its first device and save its credentials.
    Register {
        /// The user id: 1-64 characters of [a-z0-9_.-].
        user: String,
        /// The device id.
        #[arg(long, default_value = "cli")]
        device: String,
    },
    /// Send one text message.
    Send {
        /// Send as this (registered) user.
        #[arg(long = "as", value_name = "USER")]
        as_user: String,
        /// The recipient's user id.
        to: String,
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// What to wait for after sending.
        #[arg(long, value_enum, default_value_t = WaitFor::Sent)]
        wait: WaitFor,
    },
    /// Chat with another user interactively (lines typed are sent).
    Chat {
        /// Chat as this (registered) user.
        #[arg(long = "as", value_name = "USER")]
        as_user: String,
        /// The other user.
        peer: String,
    },
    /// Show the cluster's nodes and shard groups.
    Status {
        /// gRPC (admin) endpoints of nodes, host:port, comma-separated; the first that
        /// answers is asked.
        #[arg(long, default_value = "127.0.0.1:7100,127.0.0.1:7110,127.0.0.1:7120")]
        admin: String,
    },
    /// Change a user's privacy settings.
    Privacy {
        /// The user.
        #[arg(long = "as", value_name = "USER")]
        as_user: String,
        /// Send and see read receipts.
        #[arg(long, value_enum)]
        read_receipts: OnOff,
    },
}

/// How far `parley send` follows a message.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WaitFor {
    /// Until the server committed it (single tick).
    Sent,
    /// Until the recipient's device got it (double tick).
    Delivered,
    /// Until the recipient read it (blue tick).
    Read,
}

/// A boolean flag value.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Options every client command needs.
pub struct Context {
    /// Client endpoints, host:port.
    pub endpoints: Vec<String>,
    /// Where credentials are saved.
    pub profiles: profile::ProfileDir,
}

// One thread: `parley dev` forks its nodes from it, and a child's parent-death signal
// is tied to the thread that forked it (see dev_cluster).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Command::Dev(args) = cli.command {
        return dev_cluster::run(args).await;
    }
    let endpoints = parley_client::parse_endpoints(&cli.endpoint);
    anyhow::ensure!(!endpoints.is_empty(), "--endpoint lists no endpoint");
    let ctx = Context {
        endpoints,
        profiles: profile::ProfileDir::resolve(cli.profile_dir)?,
    };
    match cli.command {
        Command::Dev(_) => Ok(()),
        Command::Register { user, device } => commands::register(&ctx, &user, &device).await,
        Command::Send {
            as_user,
            to,
            text,
            wait,
        } => commands::send(&ctx, &as_user, &to, &text.join(" "), wait).await,
        Command::Chat { as_user, peer } => chat::run(&ctx, &as_user, &peer).await,
        Command::Status { admin } => status::run(&parley_client::parse_endpoints(&admin)).await,
        Command::Privacy {
            as_user,
            read_receipts,
        } => commands::privacy(&ctx, &as_user, read_receipts == OnOff::On).await,
    }
}
