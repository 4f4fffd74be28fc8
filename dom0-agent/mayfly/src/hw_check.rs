//! `mayfly hw-check` (under construction in this session's branch).

/// Arguments.
#[derive(clap::Args)]
pub struct HwCheckArgs {}

/// Runs the command.
pub fn run(_args: &HwCheckArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
