//! The `parley-operator` binary: `crd` prints the CustomResourceDefinition.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "parley-operator",
    about = "Kubernetes operator for Parley clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ParleyCluster CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", parley_operator::crd_yaml()?),
    }
    Ok(())
}
