//! `mayfly admin` (under construction in this session's branch).

/// Arguments.
#[derive(clap::Args)]
pub struct AdminArgs {}

/// Runs the command.
pub fn run(_args: &AdminArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
