//! The shared training machinery: settings (`args`), AdamW and gradient clipping
//! (`optimizer`), learning-rate schedules (`schedule`), atomic checkpoints
//! (`checkpoint`), who may write an output folder (`output_dir`), metrics files
//! (`metrics`), the loop (`trainer`) and the causal-LM
//! objective used by pretraining and SFT (`lm_task`).

pub mod args;
pub mod checkpoint;
pub mod lm_task;
pub mod metrics;
pub mod optimizer;
pub mod order;
pub mod output_dir;
pub mod schedule;
pub mod trainer;
