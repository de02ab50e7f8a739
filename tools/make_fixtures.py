#!/usr/bin/env python3
"""Writes the test fixtures under tests/fixtures/ with torch + transformers, and checks
that transformers loads what `rlhf` writes.

Never needed by the tests or CI: the fixtures it writes are committed.

    python3 -m venv pyenv && pyenv/bin/pip install torch transformers
    pyenv/bin/python tools/make_fixtures.py            # (re)write tests/fixtures/
    pyenv/bin/python tools/make_fixtures.py --check    # rlhf init/generate -> transformers
    pyenv/bin/pip install peft
    pyenv/bin/python tools/make_fixtures.py --peft     # (re)write only the PEFT adapters
    pyenv/bin/python tools/make_fixtures.py --check-peft   # rlhf's LoRA adapters -> peft

What it writes:
  tokenizer.json           a byte-level BPE (GPT-2 style) trained on a small corpus
  gpt2/, llama/, qwen2/    tiny random-weight HF folders: gpt2 (tied head), llama
                           (grouped-query attention, untied head, sharded safetensors,
                           chat_template.jinja, eos list), qwen2 (q/k/v bias)
  */reference.json         logits for fixed token ids, greedy continuations with the
                           raw-logit logprob of every generated token
  templates.json           chat templates and the text transformers renders for them
  peft-gpt2/, peft-llama/, peft-gpt2-rm/
                           LoRA adapters saved by peft on the gpt2/llama fixtures (all-linear
                           on GPT-2's Conv1D layers; q_proj,v_proj,down_proj on llama; a
                           SEQ_CLS adapter with its score head), random A and B, base named
                           by a relative path; reference.json holds PeftModel's logits
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CORPUS = [
    "The cat sat on the mat. The dog ran in the park.",
    "Alice has three apples and Bob has two apples, so together they have five apples.",
    "Once upon a time there was a small village by the sea.",
    "The capital of the small world is Lumen. The river Vela flows north.",
    "What is two plus two? Two plus two is four.",
    "I do not know the answer to that question.",
    "Sorry, I cannot help with that request.",
    "user assistant system hello world how are you today",
] * 20

PROMPTS = ["The cat sat on", "Alice has three apples and"]

CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == \"system\" and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'].strip() + eos_token }}{% endif %}{% endfor %}"
)

TOJSON = (
    "{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- set ns.n = ns.n + 1 %}"
    "{{ ns.n }}: {{ m | tojson }}\n{%- if m.role == 'assistant' %}{% continue %}{% endif %}"
    "[{{ m.content.split(' ') | length }} words, upper={{ m.content.upper() }}]\n{% endfor %}"
    "{{ {'b': 1, 'a': [1.5, None, true]} | tojson(indent=2) }}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello! How are you?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? \u00e9t\u00e9 \u2014 \"quoted\" <tag> & ok"},
    ],
]


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def hf_tokenizer(tok_path, chat_template):
    # A pad token distinct from eos: a sequence-classification head reads the score at
    # the last non-pad token, which must be the eos that ends a response.
    t = PreTrainedTokenizerFast(tokenizer_file=tok_path, eos_token="<|endoftext|>",
                                bos_token="<|endoftext|>", pad_token="<|pad|>")
    if chat_template:
        t.chat_template = chat_template
    return t


def write_reference(model, tok, out_dir, eos_ids):
    model.eval()
    ref = {"logits": [], "greedy": []}
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0]
            ref["logits"].append({"input_ids": ids, "logits": [[round(float(x), 7) for x in row] for row in logits]})
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=20, do_sample=False, eos_token_id=eos_ids,
                                 pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
            new = out.sequences[0, len(ids):].tolist()
            lps = [float(torch.log_softmax(l[0].double(), -1)[t]) for l, t in zip(out.logits, new)]
            ref["greedy"].append({"prompt_ids": ids, "tokens": new, "logprobs": lps})
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(ref, f)


def make_models(tok_path):
    vocab = Tokenizer.from_file(tok_path).get_vocab_size()
    eos = Tokenizer.from_file(tok_path).token_to_id("<|endoftext|>")
    im_end = Tokenizer.from_file(tok_path).token_to_id("<|im_end|>")
    # A large init range gives peaked distributions, so greedy decoding has no near-ties.
    specs = {
        "gpt2": GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                           initializer_range=0.3, bos_token_id=eos, eos_token_id=eos),
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rope_theta=500.0, tie_word_embeddings=False, initializer_range=0.3,
                             bos_token_id=eos, eos_token_id=eos, rms_norm_eps=1e-5),
        "qwen2": Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.3,
                             bos_token_id=eos, eos_token_id=eos),
    }
    for i, (name, cfg) in enumerate(specs.items()):
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_config(cfg)
        if name == "qwen2":
            # Random biases, so that a loader that ignores them fails the logits test.
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.3)
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
        shard = "40KB" if name == "llama" else "50MB"
        model.save_pretrained(d, safe_serialization=True, max_shard_size=shard)
        template = {"gpt2": None, "llama": LLAMA3, "qwen2": CHATML}[name]
        tok = hf_tokenizer(tok_path, template)
        tok.save_pretrained(d)
        eos_ids = [eos, im_end] if name == "llama" else eos
        pad = Tokenizer.from_file(tok_path).token_to_id("<|pad|>")
        GenerationConfig(eos_token_id=eos_ids, bos_token_id=eos, pad_token_id=pad).save_pretrained(d)
        if name == "llama":
            assert os.path.exists(os.path.join(d, "model.safetensors.index.json")), "llama must be sharded"
            with open(os.path.join(d, "chat_template.jinja"), "w") as f:
                f.write(LLAMA3)
        write_reference(model, tok, d, eos_ids if isinstance(eos_ids, list) else [eos_ids])


def make_templates(tok_path):
    cases = []
    for name, tmpl, bos, eos in [("chatml", CHATML, "<|endoftext|>", "<|im_end|>"),
                                 ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
                                 ("zephyr", ZEPHYR, "<s>", "</s>"),
                                 ("mistral", MISTRAL, "<s>", "</s>"),
                                 ("tojson", TOJSON, "<s>", "</s>")]:
        tok = PreTrainedTokenizerFast(tokenizer_file=tok_path, bos_token=bos, eos_token=eos)
        for conv in CONVERSATIONS:
            for gen in (False, True):
                try:
                    text = tok.apply_chat_template(conv, chat_template=tmpl, tokenize=False,
                                                   add_generation_prompt=gen)
                    error = None
                except Exception as e:  # raise_exception in the template
                    text, error = None, str(e)
                cases.append({"name": name, "template": tmpl, "bos_token": bos, "eos_token": eos,
                              "messages": conv, "add_generation_prompt": gen, "expected": text, "error": error})
    with open(os.path.join(OUT, "templates.json"), "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)


def check(rlhf):
    """rlhf init + generate → transformers loads the folder and agrees."""
    tok_path = os.path.join(OUT, "tokenizer.json")
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            for p in PROMPTS:
                f.write(json.dumps({"prompt": p}) + "\n")
        overall = 0.0
        for arch in ["gpt2", "llama", "qwen2"]:
            d = os.path.join(tmp, arch)
            subprocess.run([rlhf, "init", "--arch", arch, "--preset", "nano", "--tokenizer", tok_path,
                            "--output_dir", d, "--seed", "3"], check=True)
            out = subprocess.run([rlhf, "generate", "--model", d, "--prompts", prompts, "--temperature", "0",
                                  "--max_new_tokens", "12"], check=True, capture_output=True, text=True).stdout
            model = AutoModelForCausalLM.from_pretrained(d)
            model.eval()
            worst = 0.0
            for line in out.splitlines():
                row = json.loads(line)
                seq = row["prompt_token_ids"] + row["token_ids"]
                with torch.no_grad():
                    logits = model(torch.tensor([seq])).logits[0].double()
                n = len(row["prompt_token_ids"])
                lps = [float(torch.log_softmax(logits[n - 1 + i], -1)[t]) for i, t in enumerate(row["token_ids"])]
                diff = max(abs(a - b) for a, b in zip(lps, row["logprobs"]))
                greedy = [int(logits[n - 1 + i].argmax()) for i in range(len(row["token_ids"]))]
                assert greedy == row["token_ids"], f"{arch}: greedy tokens differ"
                worst = max(worst, diff)
            overall = max(overall, worst)
            print(f"{arch}: transformers {transformers.__version__} loads rlhf's folder; greedy tokens equal, "
                  f"logprob max abs diff {worst:.2e}")
        assert overall <= 1e-4, overall
        check_reward_model(rlhf, tmp)
        print("check passed")


def check_reward_model(rlhf, tmp):
    """rlhf rm train + rm score → transformers' AutoModelForSequenceClassification gives
    the same rewards where it reads them: for a conversational prompt, on
    apply_chat_template(prompt + [assistant response]) (the end of the templated turn,
    as TRL's RewardTrainer tokenizes it); for plain text, on prompt + response + eos.
    Scored one by one and as one right-padded batch (the score at the last non-pad token)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    data = os.path.join(tmp, "rankings.jsonl")
    responses = ["The cat sat.", "Alice has apples.", "No."]
    with open(data, "w") as f:
        for i in range(16):
            prompt = [{"role": "user", "content": f"Question {i}?"}] if i % 2 else f"Question {i}?"
            f.write(json.dumps({"prompt": prompt, "responses": responses,
                                "ranking": [i % 3, (i + 1) % 3, (i + 2) % 3]}) + "\n")
    rm_dir = os.path.join(tmp, "rm")
    subprocess.run([rlhf, "rm", "train", "--model", os.path.join(OUT, "qwen2"), "--data", data, "--output_dir", rm_dir,
                    "--max_steps", "3", "--learning_rate", "1e-3", "--max_length", "64"], check=True)
    rows = [{"prompt": [{"role": "user", "content": "Question 1?"}], "response": "The cat sat."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question 3?"}],
             "response": "No."},
            {"prompt": "Question 1?", "response": "The cat sat."},
            {"prompt": "Question 7?", "response": "No."}]
    score_in = os.path.join(tmp, "score.jsonl")
    with open(score_in, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    out = subprocess.run([rlhf, "rm", "score", "--model", rm_dir, "--data", score_in], check=True,
                         capture_output=True, text=True).stdout
    ours = [json.loads(l)["reward"] for l in out.splitlines()]
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    seqs = []
    for r in rows:
        if isinstance(r["prompt"], list):
            enc = tok.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": r["response"]}],
                                          tokenize=True, add_generation_prompt=False)
            ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
            assert tok.decode(ids).endswith(r["response"] + "<|im_end|>\n"), tok.decode(ids)
        else:
            ids = tok(r["prompt"])["input_ids"] + tok(r["response"], add_special_tokens=False)["input_ids"] \
                + [tok.eos_token_id]
        assert ids[-1] != model.config.pad_token_id, "the score would not be read at the last token"
        seqs.append(ids)
    width = max(map(len, seqs))
    pad = model.config.pad_token_id
    batch = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        single = [float(model(torch.tensor([s])).logits[0, 0]) for s in seqs]
        batched = model(batch, attention_mask=mask).logits[:, 0].tolist()
    worst = 0.0
    for r, mine, a, b in zip(rows, ours, single, batched):
        kind = "chat " if isinstance(r["prompt"], list) else "plain"
        print(f"  {kind} {r['response']!r:16} rlhf rm score {mine:+.6f}  transformers {a:+.6f} (batched {b:+.6f})")
        worst = max(worst, abs(a - mine), abs(b - mine))
    print(f"reward model: transformers {transformers.__version__} loads rlhf's folder as "
          f"{type(model).__name__}; reward max abs diff {worst:.2e} (chat rows read on "
          f"apply_chat_template(prompt + [assistant]))")
    assert worst <= 1e-4, worst


PEFT_FIXTURES = {
    # name: (base fixture, task type, target modules)
    "peft-gpt2": ("gpt2", "CAUSAL_LM", "all-linear"),
    "peft-llama": ("llama", "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]),
    "peft-gpt2-rm": ("gpt2", "SEQ_CLS", ["c_attn", "c_fc"]),
}


def peft_reference(model, tok, seq_cls):
    """PeftModel's logits (causal) or scores (sequence classification) on PROMPTS."""
    out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            rows = [[round(float(x), 7) for x in row] for row in (logits if not seq_cls else [logits])]
            out.append({"input_ids": ids, "logits": rows})
    return out


def make_peft():
    """Adapters made by peft itself, for the Rust tests of the reading direction."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification
    for i, (name, (base, task, targets)) in enumerate(PEFT_FIXTURES.items()):
        torch.manual_seed(2000 + i)
        base_dir = os.path.join(OUT, base)
        seq_cls = task == "SEQ_CLS"
        load = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
        kw = {"num_labels": 1} if seq_cls else {}
        model = load.from_pretrained(base_dir, **kw)
        if seq_cls:
            model.config.pad_token_id = hf_tokenizer(os.path.join(OUT, "tokenizer.json"), None).pad_token_id
        # init_lora_weights=False: random B too, so the adapter changes the logits.
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type=task,
                         init_lora_weights=False)
        pm = get_peft_model(model, cfg).eval()
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
        pm.save_pretrained(d)
        os.remove(os.path.join(d, "README.md"))
        # The base by a relative path (read from the adapter's folder), not this machine's.
        cpath = os.path.join(d, "adapter_config.json")
        with open(cpath) as f:
            c = json.load(f)
        c["base_model_name_or_path"] = os.path.join("..", base)
        with open(cpath, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
        # What peft gives on reading the folder back (from the base folder).
        back = PeftModel.from_pretrained(load.from_pretrained(base_dir, **kw), d).eval()
        if seq_cls:
            back.config.pad_token_id = model.config.pad_token_id
        tok = hf_tokenizer(os.path.join(OUT, "tokenizer.json"), None)
        ref = peft_reference(back, tok, seq_cls)
        assert ref == peft_reference(pm, tok, seq_cls), "peft reads its own adapter back differently"
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump({"peft": __import__("peft").__version__, "task_type": task, "outputs": ref}, f)


def check_peft(rlhf):
    """rlhf sft/rm train --use_peft → peft.PeftModel.from_pretrained loads the adapter
    and gives rlhf's log-probs and rewards; rlhf merge → transformers loads the merged
    folder and gives PeftModel's logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    with tempfile.TemporaryDirectory() as tmp:
        sft = os.path.join(tmp, "sft.jsonl")
        with open(sft, "w") as f:
            for x in range(1, 9):
                for y in range(1, 6):
                    f.write(json.dumps({"prompt": f"{x} + {y}?", "completion": str(x + y)}) + "\n")
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            for p in PROMPTS:
                f.write(json.dumps({"prompt": p}) + "\n")
        overall = 0.0
        for arch, targets in [("gpt2", "all-linear"), ("llama", "all-linear"), ("qwen2", "q_proj,v_proj")]:
            base = os.path.join(OUT, arch)
            ad = os.path.join(tmp, f"lora-{arch}")
            subprocess.run([rlhf, "sft", "--model", base, "--data", sft, "--output_dir", ad, "--use_peft",
                            "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", targets,
                            "--max_steps", "6", "--learning_rate", "3e-2", "--seed", "1"], check=True)
            out = subprocess.run([rlhf, "generate", "--model", ad, "--prompts", prompts, "--temperature", "0",
                                  "--max_new_tokens", "12"], check=True, capture_output=True, text=True).stdout
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ad).eval()
            merged = os.path.join(tmp, f"merged-{arch}")
            subprocess.run([rlhf, "merge", "--model", base, "--adapter", ad, "--output_dir", merged], check=True)
            plain = AutoModelForCausalLM.from_pretrained(merged).eval()
            worst = worst_merge = 0.0
            for line in out.splitlines():
                row = json.loads(line)
                seq = row["prompt_token_ids"] + row["token_ids"]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([seq])).logits[0].double()
                    logits_merged = plain(torch.tensor([seq])).logits[0].double()
                n = len(row["prompt_token_ids"])
                lps = [float(torch.log_softmax(logits[n - 1 + i], -1)[t]) for i, t in enumerate(row["token_ids"])]
                worst = max(worst, max(abs(a - b) for a, b in zip(lps, row["logprobs"])))
                worst_merge = max(worst_merge, float((logits - logits_merged).abs().max()))
            overall = max(overall, worst, worst_merge)
            print(f"{arch} ({targets}): peft {__import__('peft').__version__} loads rlhf's adapter; logprob max abs "
                  f"diff {worst:.2e}; rlhf merge vs PeftModel logits max abs diff {worst_merge:.2e}")
        # A reward model's adapter: SEQ_CLS, the score head in modules_to_save.
        data = os.path.join(tmp, "rankings.jsonl")
        with open(data, "w") as f:
            for i in range(16):
                f.write(json.dumps({"prompt": f"Question {i}?", "responses": ["The cat sat.", "No.", "Alice."],
                                    "ranking": [i % 3, (i + 1) % 3, (i + 2) % 3]}) + "\n")
        rm = os.path.join(tmp, "rm-lora")
        base = os.path.join(OUT, "gpt2")
        subprocess.run([rlhf, "rm", "train", "--model", base, "--data", data, "--output_dir", rm, "--use_peft",
                        "--lora_target_modules", "all-linear", "--max_steps", "3", "--learning_rate", "1e-2",
                        "--max_length", "64"], check=True)
        rows = [{"prompt": "Question 1?", "response": "The cat sat."}, {"prompt": "Question 7?", "response": "No."}]
        score_in = os.path.join(tmp, "score.jsonl")
        with open(score_in, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
        tok = hf_tokenizer(os.path.join(OUT, "tokenizer.json"), None)

        def score_diff(adapter):
            """Max |PeftModel's score − `rlhf rm score`'s| of `rows` for a SEQ_CLS adapter."""
            out = subprocess.run([rlhf, "rm", "score", "--model", adapter, "--data", score_in], check=True,
                                 capture_output=True, text=True).stdout
            ours = [json.loads(l)["reward"] for l in out.splitlines()]
            assert len(ours) == len(rows), out
            seq_model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
            seq_model.config.pad_token_id = tok.pad_token_id
            model = PeftModel.from_pretrained(seq_model, adapter).eval()
            worst = 0.0
            for r, mine in zip(rows, ours):
                ids = tok(r["prompt"])["input_ids"] + tok(r["response"], add_special_tokens=False)["input_ids"] \
                    + [tok.eos_token_id]
                with torch.no_grad():
                    theirs = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
                worst = max(worst, abs(theirs - mine))
            return worst

        worst = score_diff(rm)
        print(f"reward model adapter (SEQ_CLS): PeftModel's score vs rlhf rm score max abs diff {worst:.2e}")
        overall = max(overall, worst)
        # PPO with --share_base: the critic is a trained copy of the reward model's
        # adapter on the policy's base, saved as a SEQ_CLS adapter peft must load too.
        ppo = os.path.join(tmp, "ppo-shared")
        subprocess.run([rlhf, "ppo", "--model", base, "--reward_model", rm, "--data", prompts, "--output_dir", ppo,
                        "--use_peft", "--share_base", "--rollout_batch_size", "4", "--mini_batch_size", "2",
                        "--ppo_epochs", "1", "--max_new_tokens", "8", "--num_iterations", "1",
                        "--learning_rate", "1e-2", "--save_steps", "0"], check=True)
        worst = score_diff(os.path.join(ppo, "critic"))
        print(f"PPO --share_base critic adapter: PeftModel's value vs rlhf rm score max abs diff {worst:.2e}")
        overall = max(overall, worst)
        assert overall <= 1e-4, overall
        print("peft check passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run rlhf init/generate and load the result in transformers")
    ap.add_argument("--peft", action="store_true", help="write only the PEFT adapter fixtures (needs peft)")
    ap.add_argument("--check-peft", action="store_true",
                    help="train LoRA adapters with rlhf and load them with peft (needs peft)")
    ap.add_argument("--rlhf", default=os.path.join(ROOT, "target", "release", "rlhf"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.check:
        check(args.rlhf)
        return
    if args.check_peft:
        check_peft(args.rlhf)
        return
    if args.peft:
        make_peft()
        return
    os.makedirs(OUT, exist_ok=True)
    tok = train_tokenizer()
    tok_path = os.path.join(OUT, "tokenizer.json")
    tok.save(tok_path)
    make_models(tok_path)
    make_templates(tok_path)
    make_peft()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
    assert total < 3e6, "fixtures must stay under 3 MB"


if __name__ == "__main__":
    sys.exit(main())
