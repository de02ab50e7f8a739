//! The causal-LM objective over token rows, shared by pretraining and SFT: mean
//! next-token cross-entropy over the target tokens of a batch.
//!
//! Rows are single examples or packed (`--packing`): several examples laid end to end
//! in one row of `max_length`, each attending only to itself and with its own position
//! ids (`AttentionMask::from_segments`), so packing computes the same loss as padding.
//! Rows are visited in `EpochOrder`; a batch's rows are then laid into as few rows of
//! the model's input as fit (`model::packed`), so short rows are not padded to the
//! longest.

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

use super::args::TrainingArgs;
use super::order::EpochOrder;
use super::trainer::{train, LossParts, TrainSummary, TrainTask};
use crate::data::sft::SftExample;
use crate::error::Result;
use crate::model::hf::Pretrained;
use crate::model::lora::Adapter;
use crate::model::packed::Packed;
use crate::model::Params;

/// One row of a batch: tokens, targets, and which example each token belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// 1, 2, ... per example in the row (all 1 when unpacked).
    pub segments: Vec<u32>,
}

impl Row {
    pub fn single(ex: SftExample) -> Self {
        let n = ex.ids.len();
        Row {
            ids: ex.ids,
            loss_mask: ex.loss_mask,
            segments: vec![1; n],
        }
    }

    /// Target positions of next-token prediction: position t predicts token t + 1,
    /// which counts when it is a training token of the same example.
    pub fn target_weights(&self) -> impl Iterator<Item = f32> + '_ {
        (0..self.ids.len().saturating_sub(1)).map(|t| {
            let same = self.segments[t + 1] == self.segments[t];
            f32::from(u8::from(same && self.loss_mask[t + 1] == 1))
        })
    }

    pub fn num_targets(&self) -> usize {
        self.target_weights().filter(|&w| w > 0.0).count()
    }
}

/// Pretraining text as rows: documents tokenized, joined with `eos` and cut into
/// blocks of `block` tokens, every token a target.
pub fn text_rows(
    docs: &[String],
    tokenizer: &crate::data::tokenizer::Tokenizer,
    eos: u32,
    block: usize,
) -> Result<Vec<Row>> {
    Ok(crate::data::text::pack_blocks(docs, tokenizer, eos, block)?
        .into_iter()
        .map(|ids| {
            let n = ids.len();
            Row::single(SftExample {
                ids,
                loss_mask: vec![1; n],
            })
        })
        .collect())
}

/// Packs examples greedily, in order, into rows of at most `max_length` tokens.
pub fn pack(examples: Vec<SftExample>, max_length: usize) -> Vec<Row> {
    let mut rows = vec![];
    let mut cur: Option<Row> = None;
    for ex in examples {
        let fits = cur
            .as_ref()
            .is_some_and(|r| r.ids.len() + ex.ids.len() <= max_length);
        if !fits {
            rows.extend(cur.take());
            cur = Some(Row::single(ex));
            continue;
        }
        let r = cur.as_mut().expect("checked above");
        let seg = r.segments.last().copied().unwrap_or(0) + 1;
        r.segments.extend(std::iter::repeat_n(seg, ex.ids.len()));
        r.ids.extend(ex.ids);
        r.loss_mask.extend(ex.loss_mask);
    }
    rows.extend(cur);
    rows
}

pub struct LmTask {
    pub pre: Pretrained,
    /// With `--use_peft`: the adapter, the only trained tensors (`pre.model` is then
    /// the frozen base with its branches attached).
    pub adapter: Option<Adapter>,
    pub train_rows: Vec<Row>,
    pub eval_rows: Vec<Row>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    order: EpochOrder,
}

impl LmTask {
    pub fn new(
        pre: Pretrained,
        train_rows: Vec<Row>,
        eval_rows: Vec<Row>,
        batch_size: usize,
        eval_batch_size: usize,
        seed: u64,
    ) -> Self {
        let n = train_rows.len();
        LmTask {
            pre,
            adapter: None,
            train_rows,
            eval_rows,
            batch_size,
            eval_batch_size,
            order: EpochOrder::new(n, seed),
        }
    }

    fn batch_rows(&self, epoch: usize, index: usize) -> Vec<usize> {
        self.order.batch(epoch, index, self.batch_size)
    }

    /// Σ NLL over the targets of `rows` and the number of targets.
    pub fn loss_sum(&self, rows: &[&Row]) -> Result<(Tensor, usize, usize)> {
        lm_loss_sum(&self.pre.model, self.pre.tokenizer.pad_token_id(), rows)
    }
}

/// The batch's rows packed into as few rows as fit (`model::packed`: rows of one
/// example that begin alike share that prefix): the same examples and targets,
/// without computing the padding.
pub fn packed_batch(rows: &[&Row], pad: u32, device: &Device) -> Result<Packed> {
    let items: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (&r.ids[..], &r.segments[..])).collect();
    Packed::of_rows(&items, pad, device)
}

/// Σ next-token NLL over the targets of `rows` under `model`, the number of targets
/// and of tokens: (loss sum (scalar), targets, tokens).
pub fn lm_loss_sum(
    model: &crate::model::CausalLm,
    pad: u32,
    rows: &[&Row],
) -> Result<(Tensor, usize, usize)> {
    let device = &model.device;
    let tokens = rows.iter().map(|r| r.ids.len()).sum();
    // Each row's (position in the row, target token), found once.
    let row_targets: Vec<Vec<(usize, u32)>> = rows
        .iter()
        .map(|r| {
            r.target_weights()
                .enumerate()
                .filter(|&(_, w)| w > 0.0)
                .map(|(t, _)| (t, r.ids[t + 1]))
                .collect()
        })
        .collect();
    if row_targets.iter().all(Vec::is_empty) {
        return Ok((
            Tensor::zeros((), candle_core::DType::F32, device)?,
            0,
            tokens,
        ));
    }
    let packed = packed_batch(rows, pad, device)?;
    let mut picked = vec![]; // flat positions (into R·W) with a target
    let mut targets = vec![];
    for (i, row) in row_targets.iter().enumerate() {
        for &(t, target) in row {
            picked.push(packed.flat(i, t) as u32);
            targets.push(target);
        }
    }
    let hidden = model.backbone.forward(&packed.ids, &packed.mask, None)?; // (R, W, C)
    let (r, w, c) = hidden.dims3()?;
    let hidden = hidden.reshape((r * w, c))?; // (R·W, C)

    // Only positions with a target go through the LM head: prompts cost nothing.
    let n = picked.len();
    let picked = Tensor::from_vec(picked, n, device)?; // (N,)
    let targets = Tensor::from_vec(targets, n, device)?; // (N,)
    let logp = model
        .lm_head
        .token_logprobs(&hidden.index_select(&picked, 0)?, &targets)?; // (N,)
    Ok((logp.sum_all()?.neg()?, n, tokens))
}

/// Trains a causal LM on `train_rows` (evaluating on `eval_rows`) with the shared
/// loop: what `rlhf pretrain` and `rlhf sft` both end with. With an adapter (attached
/// to `pre.model`), only the adapter is trained and saved.
pub fn train_lm(
    pre: Pretrained,
    adapter: Option<Adapter>,
    train_rows: Vec<Row>,
    eval_rows: Vec<Row>,
    args: &TrainingArgs,
    resolved_config: &serde_json::Value,
    label: &str,
) -> Result<TrainSummary> {
    let mut task = LmTask::new(
        pre,
        train_rows,
        eval_rows,
        args.per_device_train_batch_size,
        args.per_device_eval_batch_size,
        args.seed,
    );
    task.adapter = adapter;
    train(&mut task, args, resolved_config, label)
}

impl TrainTask for LmTask {
    fn batches_per_epoch(&self) -> usize {
        self.order.batches(self.batch_size)
    }

    fn batch_weight(&self, epoch: usize, index: usize) -> Result<f64> {
        Ok(self
            .batch_rows(epoch, index)
            .iter()
            .map(|&i| self.train_rows[i].num_targets())
            .sum::<usize>() as f64)
    }

    fn batch_loss(&mut self, epoch: usize, index: usize) -> Result<LossParts> {
        let idx = self.batch_rows(epoch, index);
        let rows: Vec<&Row> = idx.iter().map(|&i| &self.train_rows[i]).collect();
        if let Some(a) = &self.adapter {
            a.set_dropout(Some((self.order.rank_seed(), epoch, index)));
        }
        let loss = self.loss_sum(&rows);
        if let Some(a) = &self.adapter {
            a.set_dropout(None);
        }
        let (sum, _, tokens) = loss?;
        Ok(LossParts { sum, tokens })
    }

    fn params(&self) -> &Params {
        match &self.adapter {
            Some(a) => &a.params,
            None => &self.pre.model.params,
        }
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        if self.eval_rows.is_empty() {
            return Ok(out);
        }
        let (mut total, mut count) = (0.0, 0usize);
        for chunk in self.eval_rows.chunks(self.eval_batch_size) {
            let rows: Vec<&Row> = chunk.iter().collect();
            let (sum, n, _) = self.loss_sum(&rows)?;
            total += sum
                .detach()
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            count += n;
        }
        let loss = total / count.max(1) as f64;
        out.insert("loss".into(), loss);
        out.insert("perplexity".into(), loss.exp());
        Ok(out)
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        crate::model::hf::save_trained(&self.pre, self.adapter.as_ref(), dir)
    }

    fn load_model(&mut self, dir: &Path) -> Result<()> {
        crate::model::hf::load_trained(&self.pre, self.adapter.as_ref(), dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], mask: &[u8]) -> SftExample {
        SftExample {
            ids: ids.to_vec(),
            loss_mask: mask.to_vec(),
        }
    }

    #[test]
    fn packing_fills_rows_and_never_crosses_examples_in_targets() {
        let rows = pack(
            vec![
                ex(&[1, 2, 3], &[0, 1, 1]),
                ex(&[4, 5], &[1, 1]),
                ex(&[6, 7, 8, 9], &[0, 0, 1, 1]),
            ],
            6,
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ids, [1, 2, 3, 4, 5]);
        assert_eq!(rows[0].segments, [1, 1, 1, 2, 2]);
        // Targets: 2, 3 (example 1); not 4 (first token of example 2, other segment); 5.
        let w: Vec<f32> = rows[0].target_weights().collect();
        assert_eq!(w, [1.0, 1.0, 0.0, 1.0]);
        assert_eq!(rows[1].ids, [6, 7, 8, 9]);
    }
}
