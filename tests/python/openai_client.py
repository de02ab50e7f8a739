"""The official openai client against `rlhf serve` (run by tests/serve_openai.rs).

    python3 tests/python/openai_client.py http://127.0.0.1:PORT MODEL_NAME

Exits non-zero with a traceback on the first failed check; prints one line per check.
"""
import sys

import openai

url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)

# The model list.
assert [m.id for m in client.models.list().data] == [model]

# A chat completion.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                   max_completion_tokens=8, seed=1)
assert r.object == "chat.completion", r
c = r.choices[0]
assert c.message.role == "assistant" and isinstance(c.message.content, str)
assert c.finish_reason in ("stop", "length")
assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
print("chat completion ok:", repr(c.message.content))

# Streamed, with usage: the deltas add up to the same reply (same seed).
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                        max_completion_tokens=8, seed=1, stream=True,
                                        stream_options={"include_usage": True})
text, finish, usage = "", None, None
for chunk in stream:
    assert chunk.object == "chat.completion.chunk"
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        text += ch.delta.content or ""
        finish = ch.finish_reason or finish
assert text == c.message.content, (text, c.message.content)
assert finish == c.finish_reason and usage is not None and usage.completion_tokens == r.usage.completion_tokens
print("stream ok:", usage)

# Logprobs with alternatives.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                   max_completion_tokens=5, logprobs=True, top_logprobs=2, seed=2)
lp = r.choices[0].logprobs.content
assert len(lp) >= 1
for t in lp:
    assert t.logprob <= 0 and len(t.top_logprobs) == 2 and isinstance(t.bytes, list)
    assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
print("logprobs ok:", [(t.token, round(t.logprob, 3)) for t in lp])

# n = 2.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                   max_completion_tokens=6, n=2, seed=3)
assert [ch.index for ch in r.choices] == [0, 1]
print("n=2 ok:", [ch.message.content for ch in r.choices])

# The legacy completions endpoint.
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, logprobs=1, seed=4)
assert r.choices[0].logprobs is not None and len(r.choices[0].logprobs.tokens) >= 1
print("completions ok:", repr(r.choices[0].text))

# Errors arrive as the client's typed exceptions, with the field named.
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], temperature=3)
    raise AssertionError("temperature 3 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "temperature", e.body
    print("error ok:", e.body["message"])
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
    print("unknown model ok")
try:
    openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
    print("wrong key ok")
print("all openai checks passed")
