"""A distillation teacher behind an OpenAI-compatible server (vLLM's API): its config, the check
made before any work, and its top-k log-probs of token sequences we give it.

    server = TeacherServer(TeacherServerConfig(url="http://gpu7:8000/v1", model="qwen3-32b"))
    why = server.problem(tokenizer)                 # None when it serves the model and tokenizes
    values, ids = server.prompt_topk(token_ids, k)  # [len - 1, k] each, like our own teacher's

The endpoints and shapes are vLLM's (vllm/entrypoints: serve/tokenize, openai/completion):
- `GET {url}/models` -> `{"data": [{"id": <served name>}, ...]}`;
- `POST {root}/tokenize` (root: the url without its `/v1`) with `{model, prompt,
  add_special_tokens, return_token_strs}` -> `{tokens, token_strs, count, max_model_len}`;
- `POST {url}/completions` with the prompt as token ids, `max_tokens: 1`, `prompt_logprobs: k`
  -> `choices[0].prompt_logprobs`: `null` for the first token, then per position j a mapping
  `"<token id>" -> {logprob, rank, decoded_token}` of the distribution that predicts token j: its
  top k (ranks 1..k) plus token j itself when that is not among them (its rank tells).
The server's `--max-logprobs` (vLLM: 20 by default) must be at least `top_k`. Sampling (the
positives) goes through chat completions: data_recipes.generators.HTTPGenerator.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from data_recipes.chat import Message, render

# Chat markers, a thinking block, digits, punctuation, spacing and non-ASCII text: where two
# tokenizers that share most of a vocabulary still disagree.
PROBE_TEXT = render([
    Message("system", "You are a careful assistant."),
    Message("user", "What is 12 + 7?  Show the steps.\n\tThen: x^2 - 3x, {a, b}, 1/2, 50%."),
    Message("assistant", "Answer: 19", reasoning="12 + 7 = 19 ... café, naïve, 数学, ½, ∑ 🙂"),
], add_generation_prompt=True)


@dataclass(kw_only=True, frozen=True)  # frozen: hashable, like the stage name it stands for
class TeacherServerConfig:
    """`distill.teacher` as `{kind: http, url, model, top_k}`: a teacher served by vLLM/SGLang."""

    kind: str = "http"
    url: str = ""
    """Base URL of the OpenAI-compatible API, e.g. http://gpu7:8000/v1"""
    model: str = ""
    """The served model name (GET {url}/models lists them)."""
    top_k: int = 20
    """Log-probs per token position the server returns; the distillation divergence is taken on
    this support (at most the server's --max-logprobs)."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the API key (sent only when set)."""

    def __post_init__(self):
        if self.kind != "http":
            raise ValueError(f"kind: {self.kind!r}; a teacher is a stage name or "
                             "{kind: http, url, model, top_k}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: {self.url!r}; give the server's base URL, e.g. "
                             "http://host:8000/v1")
        if not self.model:
            raise ValueError("model: name the served model (GET <url>/models lists them)")
        if self.top_k < 1:
            raise ValueError(f"top_k: {self.top_k}, must be at least 1")


def teacher_server_config(data: dict[str, Any]) -> TeacherServerConfig:
    """The config from a recipe mapping; a problem is a ValueError worded `key: what is wrong`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TeacherServerConfig),
                                                   data))
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0].strip()
        if type(e).__name__ == "ConfigKeyError":
            msg = "unknown key (one of kind, url, model, top_k, api_key_env)"
        raise ValueError(f"{getattr(e, 'full_key', '') or 'teacher'}: {msg}") from None


class TeacherServerError(RuntimeError):
    pass


class TeacherServer:
    """The three requests distillation makes of a served teacher, with retries (connection
    errors, timeouts, 429 and 5xx, exponential backoff; other HTTP errors fail at once)."""

    def __init__(self, cfg: TeacherServerConfig, timeout_s: float = 300.0, max_retries: int = 4,
                 backoff_s: float = 1.0):
        self.cfg, self.timeout_s, self.max_retries, self.backoff_s = (cfg, timeout_s, max_retries,
                                                                      backoff_s)
        self.url = cfg.url.rstrip("/")
        self.root = self.url.removesuffix("/v1")

    def _call(self, url: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.cfg.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.cfg.api_key_env]}"
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            try:
                req = urllib.request.Request(url, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {' '.join(e.read().decode(errors='replace').split())[:200]}"
                if e.code != 429 and e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = f"unreachable ({type(e).__name__}: {getattr(e, 'reason', e)})"
            except json.JSONDecodeError as e:
                last = f"not JSON ({e})"
        raise TeacherServerError(f"{url}: {last}")

    def served_models(self) -> list[str]:
        return [m["id"] for m in self._call(f"{self.url}/models").get("data", [])]

    def tokenize(self, text: str) -> dict:
        return self._call(f"{self.root}/tokenize", {"model": self.cfg.model, "prompt": text,
                                                     "add_special_tokens": False,
                                                     "return_token_strs": True})

    def problem(self, tok, min_model_len: int = 0) -> tuple[str, str] | None:
        """Why this server cannot be the teacher of a student using tokenizer `tok`, as (the
        teacher config's key, message), or None when it can: unreachable (url), not serving the
        model (model), another tokenization of PROBE_TEXT or a context shorter than
        `min_model_len` tokens (""). `tok` None: the tokenizer is not compared."""
        from data_recipes.chat import encode_text

        try:
            models = self.served_models()
            if self.cfg.model not in models:
                return "model", (f"{self.url} does not serve {self.cfg.model!r} (it serves "
                                 f"{', '.join(map(repr, models)) or 'nothing'})")
            if tok is None:
                return None
            got = self.tokenize(PROBE_TEXT)
            theirs = [int(t) for t in got["tokens"]]
        except TeacherServerError as e:
            return "url", f"the teacher server is not usable: {e}"
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return "url", f"{self.url}: malformed response ({type(e).__name__}: {e})"
        ours = encode_text(tok, PROBE_TEXT)
        if ours != theirs:
            i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
            strs = got.get("token_strs") or [str(t) for t in theirs]

            def shown(ids: list[int], pieces: list[str]) -> str:
                return f"{ids[i]} {pieces[i]!r}" if i < len(ids) else "the end"

            return "", (f"the server's tokenizer is not the student's: the probe text is "
                        f"{len(theirs)} tokens there, {len(ours)} here, first difference at "
                        f"token {i} (server {shown(theirs, strs)}, ours "
                        f"{shown(ours, [tok.piece(t) for t in ours])}); distillation compares "
                        "token distributions, so both must use one tokenizer")
        if got.get("max_model_len", min_model_len) < min_model_len:
            return "", (f"the server's max_model_len {got['max_model_len']} is below the "
                        f"{min_model_len} tokens a training row needs (seq_length + 1, plus the "
                        "one token a completion request generates)")
        return None

    def prompt_topk(self, ids: list[int], k: int) -> tuple[list[list[float]], list[list[int]]]:
        """The teacher's k largest log-probs and their token ids at every position of `ids` but
        the last, each predicting the next token: ([len - 1][k], [len - 1][k]), best first."""
        body = {"model": self.cfg.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": k}
        resp = self._call(f"{self.url}/completions", body)
        try:
            entries = resp["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            entries = None
        if not isinstance(entries, list) or len(entries) != len(ids):
            raise TeacherServerError(f"{self.url}/completions: no prompt_logprobs for the "
                                     f"{len(ids)} prompt tokens (a vLLM-compatible server is "
                                     "needed)")
        values, indices = [], []
        for j, entry in enumerate(entries[1:], 1):
            top = sorted((v["rank"], -v["logprob"], int(t)) for t, v in entry.items()
                         if v.get("rank") is not None and v["rank"] <= k)[:k]
            if len(top) < k:
                raise TeacherServerError(f"{self.url}/completions: {len(top)} log-probs at prompt "
                                         f"position {j}, {k} asked (is the server's "
                                         "--max-logprobs below top_k?)")
            values.append([-lp for _, lp, _ in top])
            indices.append([t for _, _, t in top])
        return values, indices
