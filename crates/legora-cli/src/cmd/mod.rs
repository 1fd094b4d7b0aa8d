//! One module per subcommand: `Args` (clap) and `run`.

pub mod bench;
pub mod compose;
pub mod demo;
pub mod eval;
pub mod flags;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod plugins;
pub mod score;
pub mod serve;
pub mod train;
