//! The continuous-batching engine: one OS thread owns the model and runs steps; each
//! step advances every running sequence by one token and feeds at most
//! `prefill_chunk` prompt tokens of waiting sequences, in one forward pass.
//!
//! All sequences share ONE packed row of the KV cache (B = 1). Each sequence has its
//! own segment id, and the attention mask lets a token see only earlier columns of its
//! own segment (`CausalMask::visible`); its position is the count of earlier columns of
//! its segment (`AttentionMask::from_segments`). So a step's new columns are
//!   [one token of each decoding sequence] + [up to `prefill_chunk` prompt tokens]
//! appended behind the cache, and the LM head runs only on the last new column of each
//! sequence that needs a next token. A sequence joins at a step boundary and leaves
//! when done (eos, stop string, length) or cancelled (its client went away): its
//! columns are marked 0 so nothing attends to them, and the cache drops them when
//! they are more than half of it (`KvCache::retain`). A long prompt is fed in chunks,
//! so it delays the running sequences by one chunk's work per step, never more.
//!
//! A request's n choices share one prefill: choice 0 feeds the prompt, the others
//! wait inside it (`Sequence::clones`); when the prompt's last token has run, each
//! clone gets a copy of the prompt's KV columns under its own segment
//! (`KvCache::duplicate`) and samples its first token from the same logits row. The
//! copies are the very columns a separate prefill would have computed (the same
//! forward, on the same rows), so choice i is what a request with n = 1 and seed
//! `seed + i` gives alone.
//!
//! Sampling is per sequence, from its own ChaCha8 stream (seeded by the request, or
//! randomly), with `generate::sample_token`; logprobs are those of the unmodified
//! distribution (`generate::log_softmax_at`). A prompt that fits one chunk is fed in
//! one forward as `rlhf generate` feeds it, so at batch 1 the same seed gives the same
//! tokens.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

use super::text::release;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::generate::{log_softmax_at, sample_token, sample_token_and_logprob, SamplingParams};
use crate::model::{AttentionMask, CausalLm, KvCache};

/// How one request samples (validated by the HTTP layer).
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub stop: Vec<String>,
    /// Choice i samples from ChaCha8(seed + i); random when `None`.
    pub seed: Option<u64>,
    /// How many most likely tokens to report beside each sampled one (0..=20); `None`
    /// reports no logprobs at all.
    pub logprobs: Option<usize>,
    /// OpenAI's: logit[t] −= presence·[count(t) > 0] + frequency·count(t), counting
    /// the tokens generated so far.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            stop: vec![],
            seed: None,
            logprobs: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// A request: `n` completions of one prompt.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub n: usize,
    /// Where the events go; when the receiver is dropped the job is cancelled.
    pub events: UnboundedSender<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An eos token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// A sampled token with its log-probability (and the most likely alternatives, most
/// likely first), all under the unmodified distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What one sampled token of a choice releases: new text (often empty while a
/// possible stop string or a split character is held back); the last one carries
/// `finish`.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub choice: usize,
    pub text: String,
    /// The tokens whose text this delta releases (empty unless logprobs were asked).
    pub logprobs: Vec<TokenLogprob>,
    /// Tokens sampled for this choice so far (an eos included).
    pub tokens: usize,
    pub finish: Option<FinishReason>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(Delta),
    /// The engine failed on this job (the message says how); no more events follow.
    Error(String),
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together, at most (a request with n > max_batch runs alone).
    pub max_batch: usize,
    /// Prompt tokens fed per step, at most.
    pub prefill_chunk: usize,
}

/// What `/health` reports; updated by the engine thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences prefilling or decoding.
    pub running: AtomicUsize,
    /// Requests accepted and not yet taken by the engine.
    pub waiting: AtomicUsize,
    /// Columns in the KV cache (live and garbage).
    pub cache_columns: AtomicUsize,
    /// Sequences dropped because their client went away, since the start.
    pub cancelled: AtomicUsize,
    /// Prompt tokens run through the model since the start (a request's n choices
    /// count once: they share the prefill).
    pub prefilled_tokens: AtomicUsize,
    /// Set by `EngineHandle::shutdown`: no new jobs; the engine finishes the ones it
    /// has, then stops.
    pub stopping: AtomicBool,
    /// False once the engine thread has stopped.
    pub alive: AtomicBool,
}

struct Sequence {
    segment: u32,
    choice: usize,
    prompt: Arc<Vec<u32>>,
    /// Prompt tokens in the cache.
    prefilled: usize,
    /// The token sampled last step, fed at the next.
    pending: Option<u32>,
    /// Sampled tokens (an eos included).
    generated: Vec<u32>,
    /// Token counts of `generated`, for the penalties.
    counts: HashMap<u32, u32>,
    /// Byte offset in the decoded text where each non-eos token's text starts.
    starts: Vec<usize>,
    /// Logprobs of tokens not yet released.
    unsent_logprobs: Vec<(usize, TokenLogprob)>,
    /// Bytes of decoded text already sent.
    sent: usize,
    /// Bytes of the text decoded at the last step.
    decoded_len: usize,
    rng: ChaCha8Rng,
    params: Arc<GenParams>,
    events: UnboundedSender<Event>,
    /// The request's other choices, waiting for this one's prefill to copy it.
    clones: Vec<Sequence>,
}

impl Sequence {
    fn decoding(&self) -> bool {
        self.prefilled == self.prompt.len()
    }
}

/// The scheduler and its cache; `step` runs one forward pass. Owned by one thread
/// (`spawn`), or driven directly (tests, `rlhf chat`).
pub struct Engine {
    model: CausalLm,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    config: EngineConfig,
    cache: KvCache,
    /// Segment id of each cached column (0: free, nobody attends to it).
    columns: Vec<u32>,
    seqs: Vec<Sequence>,
    next_segment: u32,
    stats: Arc<EngineStats>,
}

impl Engine {
    pub fn new(model: CausalLm, tokenizer: Tokenizer, eos: Vec<u32>, config: EngineConfig) -> Self {
        let cache = model.new_cache();
        let stats = Arc::new(EngineStats::default());
        stats.alive.store(true, Ordering::SeqCst);
        Engine {
            // Inference only: no forward records a graph.
            model: model.detached(),
            tokenizer,
            eos,
            config,
            cache,
            columns: vec![],
            seqs: vec![],
            next_segment: 1,
            stats,
        }
    }

    pub fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    /// The model's context length: a prompt plus its max_tokens must fit.
    pub fn context_length(&self) -> usize {
        self.model.config.context_length()
    }

    /// Sequences prefilling or decoding (clones waiting on a prefill included).
    pub fn running(&self) -> usize {
        self.seqs.iter().map(|s| 1 + s.clones.len()).sum()
    }

    /// Starts a job's `n` sequences; they join at the next step.
    pub fn add(&mut self, job: Job) {
        let prompt = Arc::new(job.prompt);
        let params = Arc::new(job.params);
        let base_seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut choices = (0..job.n).map(|choice| {
            let segment = self.next_segment;
            // Ids are never reused while a column may still carry them (u32 wraps
            // only after four billion sequences; 0 is skipped).
            self.next_segment = self.next_segment.checked_add(1).unwrap_or(1);
            Sequence {
                segment,
                choice,
                prompt: prompt.clone(),
                prefilled: 0,
                pending: None,
                generated: vec![],
                counts: HashMap::new(),
                starts: vec![],
                unsent_logprobs: vec![],
                sent: 0,
                decoded_len: 0,
                rng: ChaCha8Rng::seed_from_u64(base_seed.wrapping_add(choice as u64)),
                params: params.clone(),
                events: job.events.clone(),
                clones: vec![],
            }
        });
        if let Some(mut first) = choices.next() {
            first.clones = choices.collect();
            self.seqs.push(first);
        }
        self.publish();
    }

    /// One forward pass: a token of each decoding sequence and up to `prefill_chunk`
    /// prompt tokens. Returns false when there was nothing to do.
    pub fn step(&mut self) -> Result<bool> {
        self.drop_cancelled();
        let mut ids: Vec<u32> = vec![];
        let mut new_columns: Vec<u32> = vec![];
        // (sequence index, step column whose hidden state gives its next token)
        let mut heads: Vec<(usize, u32)> = vec![];
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if let Some(t) = s.pending.take() {
                ids.push(t);
                new_columns.push(s.segment);
                heads.push((i, ids.len() as u32 - 1));
            }
        }
        let mut budget = self.config.prefill_chunk;
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            if s.decoding() {
                continue;
            }
            let take = budget.min(s.prompt.len() - s.prefilled);
            self.stats
                .prefilled_tokens
                .fetch_add(take, Ordering::Relaxed);
            ids.extend_from_slice(&s.prompt[s.prefilled..s.prefilled + take]);
            new_columns.extend(std::iter::repeat_n(s.segment, take));
            s.prefilled += take;
            budget -= take;
            if s.decoding() {
                heads.push((i, ids.len() as u32 - 1));
            }
        }
        if ids.is_empty() {
            return Ok(false);
        }
        let n = ids.len();
        self.columns.extend(new_columns);
        let device = &self.model.device;
        let mask = AttentionMask::from_segments(std::slice::from_ref(&self.columns), n, device)?;
        let ids = Tensor::from_vec(ids, (1, n), device)?; // (1, N)
        heads.sort_unstable();
        let (model, cache) = (&self.model, &mut self.cache);
        // Row-independent products: a prompt chunked or beside other sequences gets
        // the bits it gets alone in `rlhf generate` (which runs the same way).
        let logits: Vec<Vec<f32>> = crate::ops::with_row_independent_products(|| {
            let hidden = model.backbone.forward(&ids, &mask, Some(cache))?; // (1, N, C)
            if heads.is_empty() {
                return Ok::<_, Error>(vec![]);
            }
            let at: Vec<u32> = heads.iter().map(|&(_, c)| c).collect();
            let at = Tensor::from_vec(at, heads.len(), device)?; // (K,)
            let rows = hidden.index_select(&at, 1)?; // (1, K, C)
            Ok(model.lm_head.forward(&rows)?.squeeze(0)?.to_vec2()?) // K rows of V
        })?;
        // Sampling is per sequence (its own RNG), so the rows are sampled in
        // parallel; `heads` is in increasing sequence order, as `iter_mut` visits.
        let mut wanted = heads.iter().map(|&(i, _)| i).peekable();
        let targets: Vec<&mut Sequence> = self
            .seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| wanted.next_if_eq(i).is_some())
            .map(|(_, s)| s)
            .collect();
        let sampled: Vec<(u32, Option<TokenLogprob>)> = targets
            .into_par_iter()
            .zip(logits.par_iter())
            .map(|(s, row)| sample(s, row))
            .collect();
        let mut finished = vec![];
        for (&(i, _), (token, logprob)) in heads.iter().zip(sampled) {
            if self.advance(i, token, logprob)? {
                finished.push(i);
            }
        }
        // Choices waiting on a prompt that has just been prefilled: copy its columns
        // and sample their first tokens from the same row.
        for (&(i, _), row) in heads.iter().zip(&logits) {
            if self.seqs[i].clones.is_empty() {
                continue;
            }
            let clones = std::mem::take(&mut self.seqs[i].clones);
            let leader = self.seqs[i].segment;
            let prompt: Vec<u32> = (0..self.columns.len() as u32)
                .filter(|&j| self.columns[j as usize] == leader)
                .collect(); // the leader's columns: its prompt, nothing sampled yet
            let mut clones: Vec<Sequence> = clones;
            let sampled: Vec<(u32, Option<TokenLogprob>)> =
                clones.par_iter_mut().map(|c| sample(c, row)).collect();
            for (mut c, (token, logprob)) in clones.into_iter().zip(sampled) {
                self.cache.duplicate(&prompt)?;
                self.columns
                    .extend(std::iter::repeat_n(c.segment, prompt.len()));
                c.prefilled = c.prompt.len();
                self.seqs.push(c);
                let j = self.seqs.len() - 1;
                if self.advance(j, token, logprob)? {
                    finished.push(j);
                }
            }
        }
        finished.sort_unstable();
        for &i in finished.iter().rev() {
            let s = self.seqs.remove(i);
            self.free(s.segment);
        }
        self.compact()?;
        self.publish();
        Ok(true)
    }

    /// Records sequence `i`'s sampled token and sends the text it releases. Returns
    /// whether the sequence is done.
    fn advance(&mut self, i: usize, token: u32, logprob: Option<TokenLogprob>) -> Result<bool> {
        let s = &mut self.seqs[i];
        let p = s.params.clone();
        s.generated.push(token);
        *s.counts.entry(token).or_insert(0) += 1;
        let eos = self.eos.contains(&token);
        if let (Some(lp), false) = (logprob, eos) {
            s.unsent_logprobs.push((s.generated.len() - 1, lp));
        }
        let length = s.generated.len() >= p.max_tokens;
        let body = if eos {
            &s.generated[..s.generated.len() - 1]
        } else {
            &s.generated[..]
        };
        let text = self.tokenizer.decode(body, true)?;
        if !eos {
            // The text before this token is what the previous step decoded.
            s.starts.push(s.decoded_len);
        }
        s.decoded_len = text.len();
        let r = release(&text, &p.stop, eos || length);
        let end = r.end.max(s.sent);
        let finish = (eos || length || r.stopped).then_some(if length && !eos && !r.stopped {
            FinishReason::Length
        } else {
            FinishReason::Stop
        });
        // A token's logprob goes out with the first text it contributes to; at the
        // end, every token before a stop string's start goes out, none after.
        let starts = &s.starts;
        let (out, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut s.unsent_logprobs)
            .into_iter()
            .partition(|(k, _)| starts[*k] < end || (finish.is_some() && !r.stopped));
        s.unsent_logprobs = keep;
        // `end` is on a character boundary of this text; should an earlier token's
        // text have changed under a later one, send nothing rather than a broken cut.
        let (text, sent) = match text.get(s.sent..end) {
            Some(t) => (t.to_string(), end),
            None => (String::new(), s.sent),
        };
        let delta = Delta {
            choice: s.choice,
            text,
            logprobs: out.into_iter().map(|(_, lp)| lp).collect(),
            tokens: s.generated.len(),
            finish,
        };
        s.sent = sent;
        // A closed receiver is noticed (and the sequence dropped) at the next step.
        let _ = s.events.send(Event::Delta(delta));
        if finish.is_none() {
            s.pending = Some(token);
        }
        Ok(finish.is_some())
    }

    /// Drops sequences whose client has gone away.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.seqs.len() {
            if self.seqs[i].events.is_closed() {
                let s = self.seqs.remove(i);
                self.free(s.segment);
                self.stats
                    .cancelled
                    .fetch_add(1 + s.clones.len(), Ordering::SeqCst);
            } else {
                i += 1;
            }
        }
    }

    fn free(&mut self, segment: u32) {
        for c in self.columns.iter_mut().filter(|c| **c == segment) {
            *c = 0;
        }
    }

    /// Drops free columns when they are more than half of the cache, and the whole
    /// cache when no sequence runs.
    fn compact(&mut self) -> Result<()> {
        if self.seqs.is_empty() {
            self.cache = self.model.new_cache();
            self.columns.clear();
            return Ok(());
        }
        let free = self.columns.iter().filter(|&&c| c == 0).count();
        if free >= 32 && free * 2 > self.columns.len() {
            let keep: Vec<u32> = (0..self.columns.len() as u32)
                .filter(|&j| self.columns[j as usize] != 0)
                .collect();
            self.cache.retain(&keep)?;
            self.columns.retain(|&c| c != 0);
        }
        Ok(())
    }

    /// Ends every running sequence with an error (after a failed step).
    pub fn fail_all(&mut self, message: &str) {
        for s in self.seqs.drain(..) {
            let _ = s.events.send(Event::Error(message.to_string()));
        }
        self.cache = self.model.new_cache();
        self.columns.clear();
        self.publish();
    }

    fn publish(&self) {
        self.stats.running.store(self.seqs.len(), Ordering::SeqCst);
        self.stats
            .cache_columns
            .store(self.columns.len(), Ordering::SeqCst);
    }
}

/// Samples a sequence's next token from its logits row (OpenAI's penalties applied
/// to a copy), with its logprobs under the unmodified row when asked.
fn sample(s: &mut Sequence, row: &[f32]) -> (u32, Option<TokenLogprob>) {
    let p = &s.params;
    let sampling = SamplingParams {
        max_new_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        ..SamplingParams::default()
    };
    // The sampled token's logprob: from the sampling pass itself when it sampled the
    // unmodified row (`sample_token_and_logprob`: the same bits as log_softmax_at,
    // without a second pass of exponentials), else from the row.
    let (token, sampled_logprob) = if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let scores = penalized(row, &s.counts, p.presence_penalty, p.frequency_penalty);
        (sample_token(&scores, &[], &sampling, &mut s.rng), None)
    } else if p.logprobs.is_some() {
        let (token, logprob) = sample_token_and_logprob(row, &[], &sampling, &mut s.rng);
        (token, Some(logprob))
    } else {
        (sample_token(row, &[], &sampling, &mut s.rng), None)
    };
    let logprob = p.logprobs.map(|k| TokenLogprob {
        id: token,
        logprob: sampled_logprob.unwrap_or_else(|| log_softmax_at(row, token as usize)),
        top: top_logprobs(row, k),
    });
    (token, logprob)
}

/// OpenAI's penalties: logit[t] − presence·[count(t) > 0] − frequency·count(t).
pub fn penalized(
    row: &[f32],
    counts: &HashMap<u32, u32>,
    presence: f32,
    frequency: f32,
) -> Vec<f32> {
    let mut scores = row.to_vec();
    for (&t, &c) in counts {
        if let (Some(x), true) = (scores.get_mut(t as usize), c > 0) {
            *x -= presence + frequency * c as f32;
        }
    }
    scores
}

/// The `k` most likely tokens of a row with their log-probabilities, most likely
/// first (ties: lower id first).
pub fn top_logprobs(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return vec![];
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    let order = |&a: &usize, &b: &usize| row[b].total_cmp(&row[a]).then(a.cmp(&b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx.into_iter()
        .map(|i| (i as u32, log_softmax_at(row, i)))
        .collect()
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full (429).
    QueueFull,
    /// The engine has stopped (503).
    Stopped,
    /// The server is shutting down: it finishes what it has and takes nothing new
    /// (503).
    ShuttingDown,
}

/// The HTTP side's handle: submits jobs to the engine thread through a bounded queue.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    pub stats: Arc<EngineStats>,
    pub queue_capacity: usize,
    pub context_length: usize,
}

impl EngineHandle {
    pub fn submit(&self, job: Job) -> std::result::Result<(), SubmitError> {
        if !self.stats.alive.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        if self.stats.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx.try_send(job).map_err(|e| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => SubmitError::QueueFull,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }

    /// Takes no new jobs from now on (`submit` answers `ShuttingDown`); the engine
    /// finishes the running and queued ones, then its thread ends (`alive` false).
    pub fn shutdown(&self) {
        self.stats.stopping.store(true, Ordering::SeqCst);
    }
}

/// Runs the engine on its own thread; the queue holds up to `max_queue` jobs.
pub fn spawn(engine: Engine, max_queue: usize) -> Result<EngineHandle> {
    let (tx, rx) = std::sync::mpsc::sync_channel(max_queue);
    let stats = engine.stats();
    let handle = EngineHandle {
        tx,
        stats: stats.clone(),
        queue_capacity: max_queue,
        context_length: engine.context_length(),
    };
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            // The engine thread is thread 0 of its own pool (RAYON_NUM_THREADS or one
            // per CPU), so that a step's parallel loops run on it and the pool's other
            // threads, instead of waking the global pool's threads while it sleeps
            // (measured at 16 clients on 2 cores: ~1600 → ~2100 tok/s, BENCHMARKS.md).
            // Its own pool, not the global one: a blocking loop on a global pool
            // thread could be picked up by another engine's join, and a panic there
            // would abort the process. The pool lives as long as the thread (rayon
            // leaks a pool that uses its builder's thread).
            let pool = rayon::ThreadPoolBuilder::new()
                .use_current_thread()
                .thread_name(|i| format!("engine-{i}"))
                .build();
            if let Err(e) = &pool {
                crate::note!("warning: the engine runs without its own thread pool: {e}");
            }
            run_loop(engine, rx);
            stats.alive.store(false, Ordering::SeqCst);
            drop(pool);
        })
        .map_err(|e| Error::Invalid(format!("cannot start the engine thread: {e}")))?;
    Ok(handle)
}

/// How often an idle engine looks whether it should stop.
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Admits jobs at step boundaries while the batch has room, and steps. A failed or
/// panicking step ends the running jobs with an error; the engine goes on. After
/// `EngineHandle::shutdown` it returns once nothing runs and nothing waits.
fn run_loop(mut engine: Engine, rx: Receiver<Job>) {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    let stats = engine.stats();
    let mut next: Option<Job> = None;
    loop {
        if engine.running() == 0 && next.is_none() {
            match rx.try_recv() {
                Ok(job) => {
                    stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    next = Some(job);
                }
                // Idle (no job waits either): hand the burst's memory back.
                Err(TryRecvError::Empty) => crate::purge_freed_memory(),
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if engine.running() == 0 && next.is_none() {
            loop {
                match rx.recv_timeout(IDLE_POLL) {
                    Ok(job) => {
                        next = Some(job);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) if !stats.stopping.load(Ordering::SeqCst) => {}
                    // Shut down with nothing left, or every handle dropped.
                    Err(_) => return,
                }
            }
            stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        loop {
            if next.is_none() {
                match rx.try_recv() {
                    Ok(job) => {
                        stats.waiting.fetch_sub(1, Ordering::SeqCst);
                        next = Some(job);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let Some(job) = next.take() else { break };
            if job.events.is_closed() {
                stats.cancelled.fetch_add(job.n, Ordering::SeqCst);
                continue; // cancelled while queued
            }
            let room = engine.config.max_batch.saturating_sub(engine.running());
            if engine.running() == 0 || job.n <= room {
                engine.add(job);
            } else {
                next = Some(job);
                break;
            }
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        match stepped {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => engine.fail_all(&format!("generation failed: {e}")),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                crate::note!("error: the engine panicked: {what}");
                engine.fail_all(&format!("generation failed: {what}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let row = [0.0f32, 3.0, 1.0, 3.0, -2.0];
        let top = top_logprobs(&row, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        assert_eq!(top[0].1, log_softmax_at(&row, 1));
        let all: f64 = top_logprobs(&row, 99)
            .iter()
            .map(|t| (t.1 as f64).exp())
            .sum();
        assert!((all - 1.0).abs() < 1e-6);
        assert!(top_logprobs(&row, 0).is_empty());
    }

    #[test]
    fn penalties_follow_openai() {
        let counts = HashMap::from([(0u32, 3u32), (2, 1)]);
        // token 0: 1.0 − 0.5 − 3·0.25; token 2: 3.0 − 0.5 − 0.25; token 1 unseen.
        assert_eq!(
            penalized(&[1.0, 2.0, 3.0], &counts, 0.5, 0.25),
            [-0.25, 2.0, 2.25]
        );
        // Negative values encourage repetition.
        assert_eq!(penalized(&[0.0, 0.0], &counts, -1.0, 0.0), [1.0, 0.0]);
    }

    #[test]
    fn a_full_queue_refuses_and_a_stopped_engine_is_reported() {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let stats = Arc::new(EngineStats::default());
        stats.alive.store(true, Ordering::SeqCst);
        let handle = EngineHandle {
            tx,
            stats: stats.clone(),
            queue_capacity: 1,
            context_length: 64,
        };
        let job = || Job {
            prompt: vec![1],
            params: GenParams::default(),
            n: 1,
            events: tokio::sync::mpsc::unbounded_channel().0,
        };
        assert_eq!(handle.submit(job()), Ok(()));
        assert_eq!(handle.submit(job()), Err(SubmitError::QueueFull)); // 429
        assert_eq!(stats.waiting.load(Ordering::SeqCst), 1);
        handle.shutdown();
        assert_eq!(handle.submit(job()), Err(SubmitError::ShuttingDown)); // 503
        stats.stopping.store(false, Ordering::SeqCst);
        drop(rx); // the engine thread is gone
        assert_eq!(handle.submit(job()), Err(SubmitError::Stopped)); // 503
        stats.alive.store(false, Ordering::SeqCst);
        assert_eq!(handle.submit(job()), Err(SubmitError::Stopped));
    }
}
