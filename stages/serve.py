"""A small OpenAI-compatible server: the CPU twin's teacher and judge, and the tests' server.

    python -m stages.serve --stage-dir runs/nanbeige3b_cpu/pretrain-<hash> --port 8765

It speaks the real protocol over real HTTP (POST /v1/chat/completions, JSON in and out); its
"model" is the arithmetic oracle, playing whichever refinement role the system prompt asks for.
Failure injection: `fail_next` answers that many requests with HTTP 500, `stall_next` sleeps past
the client's timeout on that many, `always_fail` answers every request with 500.
Every request it receives is recorded in `requests` (role and user text).

With `checkpoint=CheckpointBackend(model, tokenizer)` it serves a pipeline checkpoint the way vLLM
serves a model (vllm/entrypoints: openai/completion/protocol.py, serve/tokenize/protocol.py):
GET /v1/models; POST /tokenize; POST /v1/completions with a text or token-id prompt, `logprobs`
(top-k of each sampled token, keyed by token text) and `prompt_logprobs` (per prompt position
`{"<id>": {logprob, rank, decoded_token}}`: the top k plus the prompt token itself); and chat
completions sampled from the checkpoint with our chat template. A backend without a model serves
only /v1/models and /tokenize (a server that speaks some tokenizer). `chat="oracle"` keeps the
chat completions with the oracle while the checkpoint answers /v1/completions: the CPU twin's
refinement roles and judge need right answers, which no tiny checkpoint gives.

Not a production server (one forward at a time, no batching): on a cluster, serve with vLLM.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from data_recipes import generators as g
from data_recipes.oracles import ArithmeticOracle
from data_recipes.generators import GeneratorConfig

ROLE_OF_SYSTEM = {g.DRAFT_SYSTEM: "draft", g.CHECKLIST_SYSTEM: "checklist",
                  g.EVALUATE_SYSTEM: "evaluate", g.REVISE_SYSTEM: "revise", g.COT_SYSTEM: "cot",
                  g.JUDGE_SYSTEM: "score", g.PREFER_SYSTEM: "prefer"}


def _section(text: str, name: str) -> str:
    """The block after `name:\\n` up to the next blank line."""
    return text.split(f"{name}:\n", 1)[1].split("\n\n", 1)[0]


class CheckpointBackend:
    """vLLM's answers, computed by a pipeline checkpoint (or only its tokenizer: model None)."""

    def __init__(self, model, tok, name: str | tuple[str, ...] = "teacher",
                 max_model_len: int = 4096):
        self.names = (name,) if isinstance(name, str) else tuple(name)
        self.name = self.names[0]
        self.model, self.tok, self.max_model_len = model, tok, max_model_len
        self.lock = threading.Lock()  # one forward at a time
        self.rows_scored = 0

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in self.names]}

    def tokenize(self, body: dict) -> dict:
        from data_recipes.chat import encode_text

        ids = encode_text(self.tok, body["prompt"])
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": [self.tok.piece(i) for i in ids] if body.get("return_token_strs")
                else None}

    def _logps(self, ids: list[int]):
        """log-probs [len(ids), vocab] of the next token after each prefix of ids."""
        import torch

        from stages.engine.losses import logits_of

        n = len(ids)
        batch = {"tokens": torch.tensor([ids]), "position_ids": torch.arange(n).unsqueeze(0),
                 "attention_mask": torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1)}
        with torch.no_grad():
            return torch.log_softmax(logits_of(self.model, batch, self.tok.vocab_size)[0], -1)

    def _entry(self, lp, token: int, k: int) -> dict[str, dict[str, Any]]:
        """vLLM's Logprob mapping at one position: the top k, then `token` with its rank."""
        top = lp.topk(k)
        out = {}
        for rank, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            out[str(t)] = {"logprob": v, "rank": rank, "decoded_token": self.tok.piece(t)}
        if str(token) not in out:
            out[str(token)] = {"logprob": float(lp[token]), "rank": int((lp >= lp[token]).sum()),
                               "decoded_token": self.tok.piece(token)}
        return out

    def completions(self, body: dict) -> dict:
        from data_recipes.chat import IM_END, encode_text
        from stages.engine.generate import SamplingConfig, generate

        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else encode_text(self.tok, prompt)
        sampling = SamplingConfig(temperature=body.get("temperature", 1.0),
                                  top_p=body.get("top_p", 1.0),
                                  max_new_tokens=body.get("max_tokens", 16),
                                  seed=body.get("seed") or 0)
        with self.lock:
            new = generate(self.model, [ids], sampling,
                           {self.tok.eod_id, self.tok.token_id(IM_END)}, self.tok.vocab_size)[0]
            lp = self._logps(ids + new)
            self.rows_scored += 1
        choice = {"index": 0, "text": self.tok.decode(new), "finish_reason": "length",
                  "prompt_token_ids": ids, "token_ids": new}
        if body.get("prompt_logprobs") is not None:
            k = body["prompt_logprobs"]
            choice["prompt_logprobs"] = [None] + [self._entry(lp[j - 1], ids[j], k)
                                                  for j in range(1, len(ids))]
        if body.get("logprobs") is not None:
            k, pos = body["logprobs"], len(ids) - 1
            entries = [self._entry(lp[pos + i], t, k) for i, t in enumerate(new)]
            choice["logprobs"] = {
                "tokens": [self.tok.piece(t) for t in new],
                "token_logprobs": [e[str(t)]["logprob"] for e, t in zip(entries, new)],
                "top_logprobs": [{v["decoded_token"]: v["logprob"] for v in e.values()
                                  if v["rank"] <= k} for e in entries],
                "text_offset": [0] * len(new)}
        return {"object": "text_completion", "model": self.name, "choices": [choice]}

    def chat(self, body: dict) -> str:
        from data_recipes.chat import Message
        from data_recipes.generators import GeneratorConfig
        from stages.engine.generate import EngineGenerator

        cfg = GeneratorConfig(kind="engine", temperature=body.get("temperature", 1.0),
                              top_p=body.get("top_p", 1.0), max_tokens=body.get("max_tokens", 16),
                              seed=body.get("seed") or 0)
        chat = [Message(m["role"], m["content"]) for m in body["messages"]]
        with self.lock:
            return EngineGenerator(self.model, self.tok, cfg).complete([chat])[0]


class ChatServer:
    def __init__(self, draft_error_rate: float = 0.5, stall_s: float = 2.0,
                 checkpoint: CheckpointBackend | None = None, chat: str = "model",
                 host: str = "127.0.0.1", port: int = 0):
        self.oracle = ArithmeticOracle(GeneratorConfig(error_rate=draft_error_rate, seed=3))
        self.fixer = ArithmeticOracle(GeneratorConfig(error_rate=0.0))
        self.requests: list[tuple[str, str]] = []
        self.fail_next = self.stall_next = 0
        self.always_fail = False
        self.stall_s = stall_s
        self.delay_s = 0.0
        """Every answer takes this long (a slow model, so a test can kill a client mid-run)."""
        self.lock = threading.Lock()
        self.checkpoint = checkpoint
        self.chat_by_model = checkpoint is not None and checkpoint.model is not None \
            and chat == "model"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if server.checkpoint is not None and self.path == "/v1/models":
                    return self._send(200, server.checkpoint.models())
                return self._send(404, {"error": f"no route {self.path}"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                backend = server.checkpoint
                if backend is not None and self.path in ("/tokenize", "/v1/completions"):
                    with server.lock:
                        server.requests.append((self.path, json.dumps(body)))
                    if self.path == "/tokenize":
                        return self._send(200, backend.tokenize(body))
                    return self._send(200, backend.completions(body))
                with server.lock:
                    fail = server.always_fail or server.fail_next > 0
                    stall = not fail and server.stall_next > 0
                    server.fail_next -= fail and server.fail_next > 0
                    server.stall_next -= stall
                if stall:
                    time.sleep(server.stall_s)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                if fail:
                    return self._send(500, {"error": "injected failure"})
                time.sleep(server.delay_s)
                if server.chat_by_model:
                    with server.lock:
                        server.requests.append(("chat", body["messages"][-1]["content"]))
                    text = backend.chat(body)
                else:
                    text = server.answer(body["messages"])
                self._send(200, {"choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, messages: list[dict]) -> str:
        # a refinement role by its system prompt; any other chat (a teacher asked a question) is
        # answered as a draft of the last user turn
        role = ROLE_OF_SYSTEM.get(messages[0]["content"], "draft") \
            if messages[0]["role"] == "system" else "draft"
        user = [m for m in messages if m["role"] == "user"][-1]["content"]
        with self.lock:
            self.requests.append((role, user))
        if role == "draft":
            return self.oracle.draft([user])[0]
        if role == "checklist":  # the user turn is the bare instruction
            return "\n".join(f"- {item}" for item in self.oracle.checklist([user])[0])
        prompt = _section(user, "Instruction")
        if role == "evaluate":
            items = [line.split(". ", 1)[1] for line in _section(user, "Checklist").splitlines()]
            answer = user.split("Answer:\n", 1)[1]
            verdicts = self.oracle.evaluate([prompt], [items], [answer])[0]
            return "\n".join(f"{i}. PASS" if v.passed else f"{i}. FAIL: {v.critique}"
                             for i, v in enumerate(verdicts, 1))
        if role == "revise":
            return self.fixer.draft([prompt])[0]
        if role == "score":  # a judge that answers in words around its rating
            ok = self.fixer.score([prompt], [user.split("Answer:\n", 1)[1]])[0]
            return f"Fair enough. Score: {10 * ok:.0f}"
        if role == "prefer":
            a = _section(user, "Answer A")
            b = user.split("Answer B:\n", 1)[1]
            p = self.fixer.prefer([prompt], [a], [b])[0]
            return {1.0: "A", 0.0: "B"}.get(p, "Both are equally good.")
        cot = self.oracle.reconstruct_cot([prompt], [user.split("Final answer:\n", 1)[1]])[0]
        return f"Summary: {cot.summary}\nReasoning: {cot.reasoning}"

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    """Serve the latest checkpoint of a finished stage (its spec names the tokenizer stage)."""
    import argparse

    from stages.contract import MANIFEST, load_spec, read_json
    from stages.engine import distributed
    from stages.engine.checkpoint import checkpoint_model
    from stages.engine.generate import load_checkpoint_model
    from stages.engine.tokenizer import tokenizer_of_stage

    p = argparse.ArgumentParser(prog="python -m stages.serve", description=main.__doc__)
    p.add_argument("--stage-dir", required=True, help="a training stage's output directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-model-len", type=int,
                   help="the longest sequence served (default: the checkpoint's seq_length)")
    p.add_argument("--name", action="append", help="served model names (default: teacher, judge)")
    p.add_argument("--chat", choices=("oracle", "model"), default="oracle",
                   help="who answers chat completions (refinement roles, judge): the arithmetic "
                        "oracle (default) or the checkpoint")
    args = p.parse_args(argv)
    stage = Path(args.stage_dir)
    if not (stage / MANIFEST).is_file():
        p.error(f"--stage-dir: {stage} is not a finished stage (no {MANIFEST}); run it first")
    spec = load_spec(stage / "spec.json")
    distributed.init()  # one process: megatron's model-parallel groups of size 1
    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    overrides = {"seq_length": args.max_model_len} if args.max_model_len else None
    model_cfg = checkpoint_model(spec.model, read_json(stage / MANIFEST), overrides)
    model = load_checkpoint_model(str(stage), model_cfg, tok.vocab_size)
    backend = CheckpointBackend(model, tok, tuple(args.name or ("teacher", "judge")),
                                max_model_len=model_cfg.seq_length)
    with ChatServer(checkpoint=backend, chat=args.chat, host=args.host, port=args.port) as server:
        print(f"serving {stage.name} as {', '.join(backend.names)} at {server.url} "
              f"(chat: {args.chat}); Ctrl-C stops", flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
