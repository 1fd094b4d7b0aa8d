//! # legora-data
//!
//! Records (from plugin formats) to training batches, with no tensor library:
//!
//! 1. a [`Template`] renders a [`Record`] into text [`Segment`]s, the answer marked as
//!    trained (Alpaca as Stanford Alpaca, ChatML, raw, or a [`PromptTemplate`] hook for a
//!    model's own chat template);
//! 2. a [`Tokenize`] implementation turns the segments into an [`Example`]: `input_ids`
//!    and `labels` with [`IGNORE_INDEX`] on every prompt token, EOS appended, truncated
//!    to `max_seq_len`;
//! 3. [`split_indices`] makes deterministic train/validation splits;
//! 4. a [`Loader`] draws rows with a [`MultiTaskSampler`] (proportional, uniform,
//!    temperature or balanced mixing) and pads them into a [`Batch`] (right padding,
//!    attention mask, per-row task ids, optional packing); its [`LoaderState`] goes into
//!    checkpoints so training resumes on exactly the same stream.
//!
//! ```
//! use legora_data::*;
//! use legora_plugin_api::Record;
//!
//! let rec = Record::completion("medical", "Classify: chest pain", "cardiology");
//! let rendered = Template::Alpaca.render(&rec, 0).unwrap();
//! let (ex, _) = tokenize_rendered(&rendered, 0, &ByteTokenizer, &TokenizeOptions::new(512))
//!     .unwrap()
//!     .unwrap();
//! // only "cardiology" and EOS carry loss
//! assert_eq!(ex.num_targets(), "cardiology".len() + 1);
//! ```

mod batch;
mod error;
mod loader;
mod rng;
mod sampler;
mod split;
mod template;
mod tokenize;

pub use batch::{pack, Batch, BatchTotals, Batcher};
pub use error::{DataError, Result};
pub use legora_plugin_api::{Message, Record, Role};
pub use loader::{eval_batches, prepare_task, Loader, LoaderState};
pub use rng::{derive_seed, mix64, stable_hash, Rng};
pub use sampler::{Mixing, MultiTaskSampler, SamplerState, TaskCursor};
pub use split::{select, split_indices, Split, ValSplit};
pub use template::{
    alpaca_prompt, FnTemplate, PromptTemplate, Rendered, Segment, Template, ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
};
pub use tokenize::{
    tokenize_all, tokenize_rendered, ByteTokenizer, Example, Tokenize, TokenizeOptions,
    TokenizeStats, IGNORE_INDEX,
};
