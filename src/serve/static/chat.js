// The chat page: keeps the conversation, streams each reply from
// /v1/chat/completions (server-sent events) and shows every model text with
// textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const data = pageData();
  const history = []; // [{role, content}], the conversation so far
  let controller = null; // the AbortController of the reply being streamed

  function bubble(role, text, note) {
    const node = el("div", { class: "msg " + role },
      el("div", { class: "role" }, role),
      el("div", { class: "text" }, text),
      note ? el("div", { class: "note" }, note) : null);
    $("messages").append(node);
    node.scrollIntoView({ block: "end" });
    return node;
  }

  function render() {
    $("messages").replaceChildren();
    for (const m of history) bubble(m.role, m.content, m.note);
  }

  function busy(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
    $("regenerate").disabled = on || !history.some((m) => m.role === "assistant");
  }

  function requestMessages() {
    const system = $("system").value.trim();
    const msgs = history.map((m) => ({ role: m.role, content: m.content }));
    return system ? [{ role: "system", content: system }, ...msgs] : msgs;
  }

  // Reads server-sent events from a fetch response, calling onData with each JSON
  // payload; resolves at `data: [DONE]` or the end of the body.
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") return;
          onData(JSON.parse(payload));
        }
      }
    }
  }

  async function reply() {
    $("error").textContent = "";
    const node = bubble("assistant", "");
    node.classList.add("streaming");
    const textNode = node.querySelector(".text");
    const entry = { role: "assistant", content: "" };
    controller = new AbortController();
    busy(true);
    $("status").textContent = "generating…";
    const started = performance.now();
    let usage = null;
    let finish = null;
    try {
      const body = {
        model: data.model,
        messages: requestMessages(),
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        max_completion_tokens: Number($("max-tokens").value),
      };
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        const text = await response.text();
        let msg = response.status + " " + text;
        try { msg = JSON.parse(text).error.message; } catch (_) { /* keep the raw text */ }
        throw new Error(msg);
      }
      await readEvents(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            entry.content += choice.delta.content;
            textNode.textContent = entry.content;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      entry.note = (finish === "length" ? "cut at max tokens · " : "") +
        (usage ? usage.completion_tokens + " tokens in " + secs + " s" : secs + " s");
    } catch (err) {
      if (err.name === "AbortError") {
        entry.note = "stopped";
      } else {
        $("error").textContent = err.message;
        entry.note = "failed";
      }
    } finally {
      controller = null;
      node.classList.remove("streaming");
      history.push(entry);
      render();
      busy(false);
      $("status").textContent = "";
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("input").value;
      if (!text.trim() || controller) return;
      $("input").value = "";
      history.push({ role: "user", content: text });
      render();
      reply();
    });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
    $("regenerate").addEventListener("click", () => {
      if (controller) return;
      while (history.length && history[history.length - 1].role === "assistant") history.pop();
      if (!history.length) return;
      render();
      reply();
    });
    $("clear").addEventListener("click", () => {
      if (controller) controller.abort();
      history.length = 0;
      render();
      busy(false);
    });
    busy(false);
    $("input").focus();
  });
})();
