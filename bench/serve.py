#!/usr/bin/env python3
"""`rlhf serve` under concurrent clients: tokens/s over all requests and p50/p95 time
to first token (TTFT) for 1, 4 and 16 clients, on GPT-2-shaped models with random
weights (`tiny`, and `gpt2` = 124M), continuous batching (`--max_batch 16`) against
one request at a time (`--max_batch 1`) on the same server binary, and a peer: a
plain transformers loop serving the same requests one at a time (when torch and
transformers are installed).

Each client sends its requests one after another (streamed /v1/completions, a
32-word prompt, which the fixture's 404-token BPE makes 58 tokens, 32 new tokens,
sampling at temperature 1, no stop), so 16 clients keep up to 16 requests in flight;
every configuration serves 16 requests per burst, and a row is the median of
`--repeat` bursts (one burst lasts a fraction of a second on tiny, too short to
stand alone on a shared 2-core machine). TTFT is from sending a request to its
first streamed text: the server holds back text that is not yet whole UTF-8, and a
random model's ids mostly decode to nothing (8192 ids, 404 of them the tokenizer's),
so on these models it comes late in the generation and is not the time to the first
sampled token (`examples/bench_engine` reports that, without HTTP); tokens/s is all
completion tokens (from the usage chunk) over the wall time from the first request
to the last answer. The peer serves the same request stream from a FIFO queue on
one worker thread (model.generate, KV cache, first token timed by a streamer), with
torch on 2 threads; it has no HTTP.

    python3 bench/serve.py              # builds target/release/rlhf first
    python3 bench/serve.py --models tiny --no_peer   # one shape, no transformers rows
"""
import argparse
import http.client
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from cpu import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RLHF_BIN=path: serve with that binary (another build, for a before/after in one
# sitting) instead of building target/release/rlhf.
RLHF = os.environ.get("RLHF_BIN") or os.path.join(ROOT, "target", "release", "rlhf")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer.json")
PROMPT_TOKENS, NEW, TOTAL_REQUESTS = 32, 32, 16
CLIENTS = [1, 4, 16]
SHAPES = [("tiny", "tiny", 8192), ("gpt2-124M", "gpt2", 50257)]
MODES = [("continuous", 16), ("one-at-a-time", 1)]


def prompt_text(i):
    # Plain words: about one token each with the fixture's tokenizer; the server
    # reports the exact count (usage.prompt_tokens).
    words = "the cat sat on a mat and the dog ran to the park while a bird sang in the old tree".split()
    return " ".join(words[(i + k) % len(words)] for k in range(PROMPT_TOKENS))


class Server:
    def __init__(self, model, max_batch):
        self.proc = subprocess.Popen([RLHF, "serve", "--model", model, "--port", "0", "--max_batch", str(max_batch)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, RAYON_NUM_THREADS="2"))
        line = self.proc.stdout.readline()
        if "listening on http://" not in line:
            raise RuntimeError("server did not start: " + line + self.proc.stderr.read())
        self.host, self.port = line.strip().rsplit("http://", 1)[1].split(":")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def stream_request(server, i):
    """(ttft seconds, completion tokens) of one streamed request."""
    body = json.dumps({"prompt": prompt_text(i), "max_tokens": NEW, "temperature": 1.0, "seed": i,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    ttft, tokens = None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk["choices"]:
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return ttft, tokens


def burst(clients, serve_one):
    """Runs TOTAL_REQUESTS requests from `clients` threads, each sending its share one
    after another; returns (tokens/s, the requests' TTFTs)."""
    per_client = TOTAL_REQUESTS // clients
    results = []
    lock = threading.Lock()

    def client(c):
        for r in range(per_client):
            out = serve_one(c * per_client + r)
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(r[1] for r in results) / wall, [r[0] for r in results]


def process_cpu_seconds(pid):
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(clients, serve_one, repeat, pid=None):
    """`repeat` bursts; returns (median tokens/s, p50 TTFT, p95 TTFT over every
    request, the server's CPU cores busy over the bursts or None)."""
    cpu0, t0 = (process_cpu_seconds(pid) if pid else None), time.perf_counter()
    rates, ttfts = [], []
    for _ in range(repeat):
        rate, t = burst(clients, serve_one)
        rates.append(rate)
        ttfts.extend(t)
    cores = (process_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0) if pid else None
    ttfts.sort()
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    return statistics.median(rates), statistics.median(ttfts), p95, cores


def transformers_peer(folder):
    """A one-at-a-time serving loop in transformers, or None without torch."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        return None
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    jobs = queue.Queue()

    class FirstToken(BaseStreamer):
        def __init__(self, t0):
            self.t0, self.calls, self.ttft = t0, 0, None

        def put(self, value):
            self.calls += 1  # the first call is the prompt, the second the first token
            if self.calls == 2 and self.ttft is None:
                self.ttft = time.perf_counter() - self.t0

        def end(self):
            pass

    def worker():
        while True:
            job = jobs.get()
            if job is None:
                return
            i, t0, done = job
            ids = tok(prompt_text(i), return_tensors="pt").input_ids
            streamer = FirstToken(t0)
            torch.manual_seed(i)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                                     streamer=streamer)
            done.put((streamer.ttft, out.shape[1] - ids.shape[1]))

    thread = threading.Thread(target=worker)
    thread.start()

    def serve_one(i):
        done = queue.Queue()
        jobs.put((i, time.perf_counter(), done))
        return done.get()

    def stop():
        jobs.put(None)
        thread.join()

    serve_one(10_000)  # warm-up
    return serve_one, stop


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(s[0] for s in SHAPES),
                        help="comma-separated model labels to run (default: all)")
    parser.add_argument("--no_peer", action="store_true", help="skip the transformers peer")
    parser.add_argument("--repeat", type=int, default=5,
                        help="bursts of 16 requests per row; tokens/s is their median (default 5)")
    args = parser.parse_args()
    wanted = args.models.split(",")
    unknown = [m for m in wanted if m not in {s[0] for s in SHAPES}]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; expected one of {[s[0] for s in SHAPES]}")
    if not os.environ.get("RLHF_BIN"):
        subprocess.run(["cargo", "build", "--release", "--bin", "rlhf"], cwd=ROOT, check=True)
    print(f"server binary: {RLHF}")
    print(describe())
    print(f"load: {os.getloadavg()[0]:.2f} (1-minute average at the start)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset, vocab in [s for s in SHAPES if s[0] in wanted]:
            d = os.path.join(tmp, label)
            subprocess.run([RLHF, "init", "--arch", "gpt2", "--preset", preset, "--tokenizer", TOKENIZER,
                            "--vocab_size", str(vocab), "--output_dir", d], check=True, capture_output=True)
            for mode, max_batch in MODES:
                server = Server(d, max_batch)
                try:
                    stream_request(server, 10_000)  # warm-up
                    for clients in CLIENTS:
                        rows.append((label, mode, clients) + drive(clients, lambda i: stream_request(server, i),
                                                                   args.repeat, server.proc.pid))
                        print(rows[-1], flush=True)
                finally:
                    server.stop()
            peer = None if args.no_peer else transformers_peer(d)
            if peer is None:
                print("transformers peer skipped: " + ("--no_peer" if args.no_peer else "torch or transformers not installed"))
                continue
            serve_one, stop = peer
            for clients in CLIENTS:
                rows.append((label, "transformers 1-at-a-time", clients) + drive(clients, serve_one, args.repeat))
                print(rows[-1], flush=True)
            stop()
    print(f"load: {os.getloadavg()[0]:.2f} (1-minute average at the end)")
    print(f"\nrlhf serve: {args.repeat} bursts of {TOTAL_REQUESTS} streamed requests per row (tokens/s: the "
          f"bursts' median), {PROMPT_TOKENS}-word prompts, {NEW} new tokens, sampling; 2 threads; cores: "
          "the server process's CPU time over the row's wall time")
    print(f"{'model':<11}{'server':<26}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}"
          f"{'vs 1-at-a-time':>16}{'cores':>7}")
    base = {(r[0], r[2]): r[3] for r in rows if r[1] == "one-at-a-time"}
    for label, mode, clients, tps, p50, p95, cores in rows:
        ratio = f"{tps / base[(label, clients)]:.2f}x" if (label, clients) in base else ""
        busy = f"{cores:.2f}" if cores is not None else ""
        print(f"{label:<11}{mode:<26}{clients:>8}{tps:>9.1f}{p50:>9.3f}s{p95:>9.3f}s{ratio:>16}{busy:>7}")


if __name__ == "__main__":
    sys.exit(main())
