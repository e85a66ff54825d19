// The chat page: keeps the conversation in memory, sends it whole to /v1/chat/completions with
// stream: true, and paints the answer as server-sent events arrive. No libraries and no network
// beyond this server, so the page works offline. Text goes into the page through textContent
// only: model output is never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { model: null, history: [], controller: null };

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models");
      const card = (await resp.json()).data[0];
      state.model = card.id;
      $("model-name").textContent = card.id;
      document.title = `${card.id} · tinyllm chat`;
      if (card.max_model_len) {
        $("max-tokens").max = String(card.max_model_len);
        if (Number($("max-tokens").value) > card.max_model_len) $("max-tokens").value = String(card.max_model_len);
      }
    } catch (err) {
      setStatus(`Cannot reach the server: ${err.message}`);
    }
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function addMessage(role, text) {
    $("empty-hint").hidden = true;
    const box = document.createElement("div");
    box.className = `message ${role}`;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = role === "user" ? "You" : "Model";
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    box.append(who, content, meta);
    $("messages").append(box);
    scrollDown();
    return box;
  }

  function scrollDown() {
    $("messages").scrollTop = $("messages").scrollHeight;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
    $("prompt").readOnly = busy;
  }

  function requestBody(capped = true) {
    const body = {
      model: state.model,
      messages: state.history,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
    };
    if (capped) body.max_tokens = Math.max(1, Math.floor(Number($("max-tokens").value) || 1));
    return body;
  }

  function post(body, controller) {
    return fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
  }

  // Yields the data field of each server-sent event in a fetch response body.
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
        if (data.length) yield data.join("\n");
      }
    }
  }

  async function streamAnswer(bubble, controller) {
    const content = bubble.querySelector(".content");
    const result = { text: "", usage: null, finish: null };
    let resp = await post(requestBody(), controller);
    let body = resp.ok ? null : await resp.json().catch(() => null);
    // "Max tokens" caps the answer; once the conversation leaves less room than that in the
    // context, the API refuses the cap (as OpenAI's does), so ask again for what room is left.
    if (body?.error?.code === "context_length_exceeded" && body.error.param === "max_tokens") {
      resp = await post(requestBody(false), controller);
      body = resp.ok ? null : await resp.json().catch(() => null);
    }
    if (!resp.ok) throw new Error(body?.error?.message || `HTTP ${resp.status}`);
    for await (const data of sseData(resp.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) result.usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          result.text += choice.delta.content;
          content.textContent = result.text;
          scrollDown();
        }
        if (choice.finish_reason) result.finish = choice.finish_reason;
      }
    }
    return result;
  }

  function describe(bubble, result) {
    const meta = bubble.querySelector(".meta");
    if (result.usage) {
      bubble.dataset.promptTokens = String(result.usage.prompt_tokens);
      bubble.dataset.completionTokens = String(result.usage.completion_tokens);
      meta.textContent = `${result.usage.prompt_tokens} prompt + ${result.usage.completion_tokens} generated tokens`;
    }
    if (result.finish === "length") meta.textContent += " · stopped at max tokens";
    if (!result.text) bubble.querySelector(".content").textContent = "(empty answer)";
  }

  async function send(text) {
    state.history.push({ role: "user", content: text });
    const userBubble = addMessage("user", text);
    const bubble = addMessage("assistant", "");
    bubble.classList.add("streaming");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    setStatus("");
    try {
      const result = await streamAnswer(bubble, controller);
      state.history.push({ role: "assistant", content: result.text });
      describe(bubble, result);
    } catch (err) {
      if (controller.signal.aborted) {
        const partial = bubble.querySelector(".content").textContent;
        if (state.controller === controller) state.history.push({ role: "assistant", content: partial });
        bubble.querySelector(".meta").textContent = "stopped";
      } else {
        // Forget the failed turn, so the next message does not carry a question without answer.
        state.history.pop();
        userBubble.classList.add("failed");
        bubble.classList.add("error");
        bubble.querySelector(".content").textContent = err.message;
      }
    } finally {
      bubble.classList.remove("streaming");
      bubble.classList.add("done");
      if (state.controller === controller) {
        state.controller = null;
        setBusy(false);
      }
    }
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.controller = null;
    state.history = [];
    for (const el of [...$("messages").querySelectorAll(".message")]) el.remove();
    $("empty-hint").hidden = false;
    setBusy(false);
    setStatus("");
    $("prompt").focus();
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    if (!state.model) {
      setStatus("The model list has not loaded yet; try again in a moment.");
      return;
    }
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  });

  loadModel();
})();
