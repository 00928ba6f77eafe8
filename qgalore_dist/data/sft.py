"""Fine-tuning data: instruction / chat records, chat templates, loss masks, packing and padding batches.

Records come from JSONL (one JSON object a line; blank lines allowed), JSON (a top-level list of objects) or a folder
of those (sorted). Four formats, auto-detected from the first record's keys or named with ``--format``:

* ``prompt_completion`` ``{"prompt": str, "completion": str}``: plain text, no template; the tokens are
  ``tokenize(prompt) + tokenize(completion) + [EOS]`` and the loss covers the completion and EOS. A ``prompt`` that is
  a list of messages (TRL's conversational form) makes it a chat whose loss covers only the completion turns.
* ``alpaca`` ``{"instruction", "input"?, "output", "system"?, "history"?}``: the chat ``[system?, *history, user:
  instruction + "\\n\\n" + input, assistant: output]``.
* ``chat`` ``{"messages": [{"role": system|user|assistant, "content": str}, ...]}``.
* ``sharegpt`` ``{"conversations": [{"from": human|gpt|system, "value": str}, ...], "system"?}``.

Every record may carry ``"answer"`` (the reference final answer for exact-match evaluation). Chats are rendered with
the tokenizer's chat template through transformers (or ``--chat-template FILE``, or the shipped
``assets/chat_template.jinja`` when the tokenizer has none) and the loss covers the assistant turns; see
`ChatRenderer` for how the assistant spans are found. Bad data raises `DataError` whose message starts with
``FILE:LINE:``.

`SFTDataset.build` reads, validates and tokenizes everything up front (nothing is written anywhere); `SFTBatcher`
turns it into the same deterministic, resumable, data-parallel batches as `TokenBatcher`, packed or padded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from qgalore_dist.data.corpus import DataError

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "FORMATS",
    "PACKING_UNSUPPORTED",
    "TRUNCATION",
    "ChatRenderer",
    "Example",
    "SFTBatcher",
    "SFTDataset",
    "SFTOptions",
    "SFTStream",
    "TokenizedExample",
    "extract_answer",
    "read_examples",
    "resolve_chat_template",
]

FORMATS = ("auto", "prompt_completion", "alpaca", "chat", "sharegpt")
TRUNCATION = ("truncate", "skip")
DEFAULT_CHAT_TEMPLATE = Path(__file__).with_name("assets") / "chat_template.jinja"
# model_type -> why, for architectures whose packed rows (position ids restarting per example, no attention mask,
# use_cache=False) do not compute what each example computes alone under transformers' sdpa / eager attention.
# Filled from tests/unit/test_packing_logits.py, which checks every architecture this repository trains.
PACKING_UNSUPPORTED: dict[str, str] = {}
IGNORE_INDEX = -100  # the label of a position that is not a training target (torch cross_entropy's ignore_index)

DATA_SUFFIXES = (".jsonl", ".json")
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# ShareGPT speaks of human/gpt; many converted sets use user/assistant in the same field, so both are accepted.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# Auto-detection: the first of these keys present in the first record decides the format.
_DETECT_KEYS = (
    ("messages", "chat"),
    ("conversations", "sharegpt"),
    ("instruction", "alpaca"),
    ("prompt", "prompt_completion"),
    ("completion", "prompt_completion"),
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Where a final answer written after '####' ends: its line, or the first end-of-turn marker of a common template.
_ANSWER_END = re.compile(r"\n|<\||</s>|<eos>|<end_of_turn>|\[/?INST\]")


@dataclass(frozen=True)
class SFTOptions:
    """How fine-tuning records become training examples (the ``--format`` ... ``--val-fraction`` flags)."""

    format: str = "auto"
    train_on_prompt: bool = False  # loss on every token but the first, not only on completions / assistant turns
    truncation: str = "truncate"  # policy for an example longer than seq_len + 1 tokens (see `SFTDataset.build`)
    packing: bool = True  # False = padding mode: one example per row, right-padded
    chat_template: str | None = None  # a jinja file overriding the tokenizer's chat template
    val_fraction: float = 0.05  # held-out fraction, used only when no validation source is given

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"--truncation must be one of {', '.join(TRUNCATION)}; got {self.truncation!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must lie in [0, 1); got {self.val_fraction}")


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Example:
    """One validated record. A chat has ``messages`` ((role, content) pairs, roles system/user/assistant); a plain
    prompt/completion has ``prompt`` and ``completion`` and no messages."""

    source: str  # FILE:LINE where the record starts
    format: str  # the format it was read as (one of FORMATS minus "auto")
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""
    trained_from: int = 0  # chat: only assistant turns at message index >= this are targets (a chat prompt's own
    #                        assistant turns are context, not completion)
    answer: str | None = None  # the record's "answer" field

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    @property
    def final_text(self) -> str:
        """The completion, or the content of the last assistant turn: where a '####' answer is looked for."""
        if not self.is_chat:
            return self.completion
        return next(content for role, content in reversed(self.messages) if role == "assistant")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: data path does not exist")
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{path}: fine-tuning data must be a .jsonl or .json file (or a folder of them)")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: no .jsonl or .json files found")
    return files


def _iter_records(file: Path) -> Iterator[tuple[int, Any]]:
    """``(line, value)`` for each record of one file: the line where the record starts (1-based)."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{file}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x})") from exc
    if text.startswith("\ufeff"):  # a byte-order mark some editors write; not part of the JSON
        text = text[1:]
    if _is_json_list(text):
        yield from _iter_json_list(file, text)
        return
    # Split on '\n' only: str.splitlines() would also split inside JSON strings holding U+2028 and friends.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = " (a .json file must hold a list of records, or one record per line)" if (
                file.suffix.lower() == ".json") else ""
            raise DataError(f"{file}:{number}: invalid JSON ({exc.msg} at column {exc.colno}){hint}") from exc
        except RecursionError as exc:
            raise DataError(f"{file}:{number}: JSON nested too deeply to read") from exc
        yield number, value


def _is_json_list(text: str) -> bool:
    """Whether ``text`` is one JSON list (of records) rather than JSON lines, whatever the file's suffix: it starts with
    '[' and its first line is not a complete JSON value followed by more lines (that is a JSONL file whose first
    record is, wrongly, a list: reported as such at line 1)."""
    body = text.lstrip()
    if not body.startswith("["):
        return False
    first = body.split("\n", 1)[0]
    try:
        json.loads(first)
    except (json.JSONDecodeError, RecursionError):
        return True  # a list spread over lines (or broken JSON, reported at its line by the list parser)
    return not body[len(first):].strip()


def _iter_json_list(file: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Records of a JSON list with the line each element starts on (json.load alone would lose the lines)."""
    decoder = json.JSONDecoder()
    counted_to, line = 0, 1  # newlines are counted incrementally: text[:counted_to] holds line - 1 of them

    def line_at(pos: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(skip_ws(0) + 1)  # past '['
    if pos < len(text) and text[pos] == "]":
        if skip_ws(pos + 1) != len(text):
            raise DataError(f"{file}:{line_at(skip_ws(pos + 1))}: invalid JSON (extra data after the list)")
        return
    while True:
        start = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError as exc:
            raise DataError(f"{file}:{line_at(start)}: JSON nested too deeply to read") from exc
        yield line_at(start), value
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            end = skip_ws(pos + 1)
            if end != len(text):
                raise DataError(f"{file}:{line_at(end)}: invalid JSON (extra data after the list)")
            return
        what = "unterminated list" if pos >= len(text) else f"expected ',' or ']', found {text[pos]!r}"
        raise DataError(f"{file}:{line_at(min(pos, len(text)))}: invalid JSON ({what})")


def _detect(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is not a JSON object (got {_json_type(record)})")
    for key, fmt in _DETECT_KEYS:
        if key in record:
            return fmt
    keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    raise DataError(
        f"{where}: cannot tell the data format from the record's keys ({keys}); expected 'prompt'/'completion', "
        "'instruction'/'output' (alpaca), 'messages' (chat) or 'conversations' (sharegpt), or pass --format"
    )


def _get(record: dict, key: str, where: str, fmt: str, *, optional: bool = False) -> Any:
    if key not in record or (optional and record[key] is None):
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r} (format {fmt})")
    return record[key]


def _text(record: dict, key: str, where: str, fmt: str, *, optional: bool = False, nonempty: bool = False) -> str:
    value = _get(record, key, where, fmt, optional=optional)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(value)}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: empty {key!r}: nothing to train on")
    return value


def _messages(
    value: Any, where: str, key: str, roles: dict[str, str], role_key: str = "role", content_key: str = "content"
) -> list[tuple[str, str]]:
    """Validated (role, content) pairs of a message list, roles mapped to system/user/assistant."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of messages, got {_json_type(value)}")
    if not value:
        raise DataError(f"{where}: field {key!r} is an empty list")
    out = []
    for i, message in enumerate(value):
        at = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {at} must be an object with {role_key!r} and {content_key!r}, "
                            f"got {_json_type(message)}")
        for name in (role_key, content_key):
            if name not in message:
                raise DataError(f"{where}: missing field {name!r} in {at}")
        role, content = message[role_key], message[content_key]
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{where}: unknown role {role!r} in {at} (allowed: {', '.join(roles)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: field {content_key!r} of {at} must be a string, got {_json_type(content)}")
        role = roles[role]
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: empty assistant content in {at}: nothing to train on")
        out.append((role, content))
    return out


def _require_assistant(messages: Sequence[tuple[str, str]], where: str, what: str = "conversation") -> None:
    if not any(role == "assistant" for role, _ in messages):
        raise DataError(f"{where}: {what} has no assistant turn: nothing to train on")


def _answer(record: dict, where: str) -> str | None:
    value = record.get("answer")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {_json_type(value)}")
    return str(value).strip()


def _example(record: Any, fmt: str, where: str) -> Example:
    """Validate one record as ``fmt`` and turn it into an `Example`; `DataError` names ``where`` (FILE:LINE)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is not a JSON object (got {_json_type(record)})")
    answer = _answer(record, where)
    if fmt == "prompt_completion":
        prompt = _get(record, "prompt", where, fmt)
        completion = _get(record, "completion", where, fmt)
        if isinstance(prompt, list):  # TRL's conversational prompt/completion
            head = _messages(prompt, where, "prompt", CHAT_ROLES)
            if isinstance(completion, str):
                if not completion.strip():
                    raise DataError(f"{where}: empty 'completion': nothing to train on")
                tail = [("assistant", completion)]
            else:
                tail = _messages(completion, where, "completion", CHAT_ROLES)
                _require_assistant(tail, where, "'completion'")
            return Example(where, fmt, tuple(head + tail), trained_from=len(head), answer=answer)
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {_json_type(prompt)}")
        completion = _text(record, "completion", where, fmt, nonempty=True)
        return Example(where, fmt, prompt=prompt, completion=completion, answer=answer)
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where, fmt)
        extra = _text(record, "input", where, fmt, optional=True)
        output = _text(record, "output", where, fmt, nonempty=True)
        system = _text(record, "system", where, fmt, optional=True)
        messages = [("system", system)] if system else []
        for turn in _get(record, "history", where, fmt, optional=True) or []:  # LLaMA-Factory: [[query, reply], ...]
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"{where}: field 'history' must be a list of [query, response] string pairs")
            if not turn[1].strip():
                raise DataError(f"{where}: empty response in 'history': nothing to train on")
            messages += [("user", turn[0]), ("assistant", turn[1])]
        prompt = instruction + ("\n\n" + extra if extra else "")
        return Example(where, fmt, tuple(messages + [("user", prompt), ("assistant", output)]), answer=answer)
    if fmt == "chat":
        messages = _messages(_get(record, "messages", where, fmt), where, "messages", CHAT_ROLES)
        _require_assistant(messages, where)
        return Example(where, fmt, tuple(messages), answer=answer)
    if fmt == "sharegpt":
        messages = _messages(_get(record, "conversations", where, fmt), where, "conversations", SHAREGPT_ROLES,
                             role_key="from", content_key="value")
        system = _text(record, "system", where, fmt, optional=True)
        if system and messages[0][0] != "system":
            messages.insert(0, ("system", system))
        _require_assistant(messages, where)
        return Example(where, fmt, tuple(messages), answer=answer)
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def _check_unicode(record: Any, where: str) -> None:
    """Every string of a record is encodable text: a JSON escape such as "\\ud800" decodes to an unpaired surrogate,
    which the tokenizer cannot take (a TypeError deep inside it otherwise). Iterative: records may nest deeply."""
    stack = [record]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"{where}: a string holds an unpaired surrogate ({value[exc.start]!r} at character "
                                f"{exc.start}), which is not text; fix the \\u escape") from exc
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def read_examples(path: str | Path, fmt: str = "auto") -> list[Example]:
    """Read and validate every record of a .jsonl / .json file or a folder of them (sorted, recursive).

    With ``fmt="auto"`` the format comes from the first record's keys and every record must fit it. Raises
    `DataError` ``"FILE:LINE: what is wrong"`` at the first bad record, or for a file without records.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    examples: list[Example] = []
    for file in _data_files(Path(path).expanduser()):
        count = 0
        for line, record in _iter_records(file):
            where = f"{file}:{line}"
            _check_unicode(record, where)
            if fmt == "auto":
                fmt = _detect(record, where)
            examples.append(_example(record, fmt, where))
            count += 1
        if count == 0:
            raise DataError(f"{file}:1: empty file (no records)")
    return examples


def extract_answer(text: str) -> str | None:
    """The final answer written after the last ``####`` (GSM8K style), up to the end of its line or the first
    end-of-turn marker (``<|...``, ``</s>``, ``[INST]`` ...), stripped; None without ``####`` or when it is empty.
    Use it on references and on generated text alike."""
    if "####" not in text:
        return None
    tail = _ANSWER_END.split(text.rsplit("####", 1)[1], maxsplit=1)[0].strip()
    return tail or None


# ----------------------------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizedExample:
    """One example as tokens. ``ids``: int32 ``[n]``; ``loss``: bool ``[n]``, token i is a training target (predicted
    from the tokens before it; ``loss[0]`` is always False)."""

    ids: np.ndarray
    loss: np.ndarray
    source: str  # FILE:LINE
    prompt_len: int  # tokens before the (last) completion / assistant turn: ids[:prompt_len] is the generation prompt
    answer: str | None  # reference final answer: the `answer` field, else extract_answer(last completion), else None
    truncated: bool = False  # cut to seq_len + 1 tokens by --truncation truncate

    @property
    def n_loss(self) -> int:
        return int(self.loss.sum())


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, path: str | Path | None = None) -> tuple[str, str]:
    """``(template, description)``: the file ``path``, else the tokenizer's own template, else the shipped default."""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"{file}: chat template file does not exist")
        try:
            template = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{file}: unreadable chat template ({exc})") from exc
        if not template.strip():
            raise DataError(f"{file}: chat template file is empty")
        return template, str(file)
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.get_chat_template(), "the tokenizer's chat template"
        except ValueError as exc:  # several named templates and none called "default"
            raise DataError(f"tokenizer: {exc} (or pass --chat-template FILE)") from exc
    shipped = DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")
    return shipped, f"the shipped default chat template ({DEFAULT_CHAT_TEMPLATE})"


def _runs(mask: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of nonzero entries of a 1-D mask."""
    m = np.concatenate([[0], np.asarray(mask, dtype=np.int8) != 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


class ChatRenderer:
    """Renders chats with a jinja chat template through transformers and finds the assistant tokens.

    * A template with ``{% generation %}`` markers (the shipped default has them): transformers'
      ``return_assistant_tokens_mask=True``. A mask with no token set is refused (transformers would only warn).
    * A template without markers (most published ones): assistant turn k spans the characters between the rendering
      of ``messages[:k]`` with the generation prompt and the rendering of ``messages[:k + 1]``; both must be string
      prefixes of the whole conversation's rendering, or the template is refused for this conversation (it rewrites
      earlier turns, e.g. drops reasoning). The character spans become tokens through the tokenizer's offsets, the
      rule transformers uses for its own mask (a token overlapping a span is in it). Prefix renderings are compared as
      *text*, not as token ids: a byte-level BPE tokenizes a prompt ending in "\\n\\n" alone as one token and the same
      characters followed by content as two ("\\n", "\\n"), so token-id prefixes break on e.g. Llama-3's header
      although the template is perfectly stable. Tokenizers without offsets (slow ones) fall back to token-id prefixes
      (``span_method="tokens"``) and refuse the conversation when those are unstable.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, description: str,
                 span_method: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.description = description
        self.has_markers = bool(_GENERATION_TAG.search(template))
        if span_method is None:
            span_method = "offsets" if getattr(tokenizer, "is_fast", False) else "tokens"
        if span_method not in ("offsets", "tokens"):
            raise ValueError(f"span_method must be 'offsets' or 'tokens', got {span_method!r}")
        self.span_method = span_method

    def _apply(self, messages: Sequence[tuple[str, str]], where: str, **kwargs: Any) -> Any:
        import jinja2  # transformers renders templates with it but does not depend on it: import where needed

        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            return self.tokenizer.apply_chat_template(conversation, chat_template=self.template, **kwargs)
        except jinja2.TemplateSyntaxError as exc:
            raise DataError(f"{self.description}: chat template does not parse (line {exc.lineno}: {exc})") from exc
        except (jinja2.TemplateError, ValueError, TypeError) as exc:  # raise_exception(...) in the template, ...
            raise DataError(f"{where}: {self.description} refused this conversation ({exc})") from exc

    def render(self, messages: Sequence[tuple[str, str]], where: str = "", add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``."""
        return self._apply(messages, where, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str, offsets: bool = False) -> Any:
        # As apply_chat_template tokenizes a rendered chat: the template writes BOS etc. itself.
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)

    def tokenize(self, messages: Sequence[tuple[str, str]], where: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the rendered chat and ``[start, end)`` token spans of its assistant turns, in order."""
        if self.has_markers:
            out = self._apply(messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, spans = list(out["input_ids"]), _runs(out["assistant_masks"])
            if not spans:
                raise DataError(f"{where}: the {{% generation %}} markers of {self.description} mark no token of this "
                                "conversation (the assistant mask is empty)")
            return ids, spans
        full = self.render(messages, where)
        char_spans = []
        for k, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            if k == 0:
                raise DataError(f"{where}: the conversation starts with an assistant turn, which {self.description} "
                                "(no {% generation %} markers) cannot locate; start with a user turn or use a template "
                                "with markers")
            before = self.render(messages[:k], where, add_generation_prompt=True)
            after = self.render(messages[: k + 1], where)
            for name, text in ((f"messages[:{k}] with the generation prompt", before), (f"messages[:{k + 1}]", after)):
                if not full.startswith(text):
                    raise DataError(
                        f"{where}: {self.description} is not prefix-stable: rendering {name} is not a prefix of the "
                        "whole conversation's rendering, so the assistant turns cannot be located; use a template "
                        "with {% generation %} markers (--chat-template FILE)"
                    )
            if len(after) <= len(before):
                raise DataError(f"{where}: {self.description} renders assistant message {k} as nothing")
            char_spans.append((len(before), len(after)))
        if self.span_method == "offsets":
            enc = self._encode(full, offsets=True)
            return list(enc["input_ids"]), _char_to_token_spans(enc["offset_mapping"], char_spans)
        ids = list(self._encode(full)["input_ids"])
        spans = []
        for start, end in char_spans:
            head = list(self._encode(full[:start])["input_ids"])
            upto = list(self._encode(full[:end])["input_ids"])
            if ids[: len(head)] != head or ids[: len(upto)] != upto:
                raise DataError(
                    f"{where}: {self.description} is not token-prefix-stable with this tokenizer: tokenizing the text "
                    "before or through an assistant turn alone gives ids that are not a prefix of the whole "
                    "conversation's ids; use a template with {% generation %} markers (--chat-template FILE)"
                )
            spans.append((len(head), len(upto)))
        return ids, spans


def _char_to_token_spans(offsets: Sequence[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[
        tuple[int, int]]:
    """Token spans of character spans: a token belongs to a span when their characters overlap (transformers' rule
    for ``return_assistant_tokens_mask``). Both lists are in order."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    out = []
    for lo, hi in char_spans:
        inside = np.flatnonzero((bounds[:, 1] > lo) & (bounds[:, 0] < hi))
        if inside.size:
            out.append((int(inside[0]), int(inside[-1]) + 1))
    return out


class _Tokenizer:
    """Turns `Example`s into untruncated `TokenizedExample`s (the chat template is resolved on first need)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: SFTOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self._renderer: ChatRenderer | None = None
        self.rendered_chats = False
        if options.chat_template is not None:  # a bad --chat-template is reported even for plain-text data
            self._renderer = ChatRenderer(tokenizer, *resolve_chat_template(tokenizer, options.chat_template))

    @property
    def renderer(self) -> ChatRenderer:
        if self._renderer is None:
            self._renderer = ChatRenderer(self.tokenizer, *resolve_chat_template(self.tokenizer))
        return self._renderer

    @property
    def template_used(self) -> ChatRenderer | None:
        return self._renderer if self.rendered_chats else None

    def __call__(self, ex: Example) -> TokenizedExample:
        if ex.is_chat:
            self.rendered_chats = True
            ids, spans = self.renderer.tokenize(ex.messages, ex.source)
            assistant_at = [k for k, (role, _) in enumerate(ex.messages) if role == "assistant"]
            if ex.trained_from:
                # Drop the spans of the prompt's own assistant turns; needs one span per assistant message.
                if len(spans) != len(assistant_at):
                    raise DataError(f"{ex.source}: {self.renderer.description} gives {len(spans)} assistant spans for "
                                    f"{len(assistant_at)} assistant messages, so the completion cannot be told apart")
                spans = [s for s, k in zip(spans, assistant_at) if k >= ex.trained_from]
            loss = np.zeros(len(ids), dtype=bool)
            for start, end in spans:
                loss[start:end] = True
            prompt_len = spans[-1][0] if spans else len(ids)
        else:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise DataError(f"{ex.source}: the tokenizer has no EOS token, which prompt/completion examples need "
                                "to mark where a completion ends")
            # Prompt and completion are tokenized apart, so training sees exactly the prompt ids that generation is
            # later given (tokenizing them joined could merge tokens across the boundary).
            # add_special_tokens=True for the prompt: a BOS where the model has one, as a generation prompt gets it.
            prompt = list(self.tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
            completion = list(self.tokenizer(ex.completion, add_special_tokens=False)["input_ids"])
            ids = prompt + completion + [int(eos)]
            loss = np.zeros(len(ids), dtype=bool)
            loss[len(prompt):] = True
            prompt_len = len(prompt)
        if self.options.train_on_prompt:
            loss[:] = True
        loss[0] = False  # nothing predicts the first token
        answer = ex.answer if ex.answer is not None else extract_answer(ex.final_text)
        return TokenizedExample(np.asarray(ids, dtype=np.int32), loss, ex.source, prompt_len, answer)


# ----------------------------------------------------------------------------------------------- dataset


def _fingerprint(examples: Sequence[TokenizedExample]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(np.int64(len(ex.ids)).tobytes())
        digest.update(ex.ids.astype(np.int32, copy=False).tobytes())
        digest.update(np.packbits(ex.loss).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class SFTDataset:
    """Tokenized train / validation examples, validated at construction (`build`); nothing is written anywhere.

    ``stats``: counts (``examples`` read, ``train_examples``, ``val_examples``, ``truncated``, ``skipped``,
    ``loss_tokens`` / ``tokens`` of the training split, ``max_tokens`` of an example). ``vocab_size``: max id + 1 seen
    (the model's embedding must cover it). ``source``: for banners.
    """

    train: list[TokenizedExample]
    val: list[TokenizedExample]
    source: str = ""
    vocab_size: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # log lines of `build` (template, split)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = _fingerprint(self.train)
        if self.vocab_size is None and (self.train or self.val):
            self.vocab_size = max(int(ex.ids.max()) for ex in self.train + self.val) + 1

    def log_lines(self) -> list[str]:
        """What a run should print about its data: sizes, split, template, truncation counts."""
        s = self.stats
        lines = list(self.notes)
        lines.append(f"{s.get('train_examples', len(self.train))} training examples "
                     f"({s.get('loss_tokens', sum(ex.n_loss for ex in self.train))} loss tokens of "
                     f"{s.get('tokens', sum(len(ex.ids) for ex in self.train))}), "
                     f"{s.get('val_examples', len(self.val))} validation examples")
        policy = s.get("truncation")
        if s.get("truncated"):
            lines.append(f"{s['truncated']} examples longer than seq_len+1 ({s['max_tokens']}) tokens truncated "
                         f"(policy --truncation {policy})")
        if s.get("skipped"):
            why = ("longer than seq_len+1 ({}) tokens".format(s["max_tokens"]) if policy == "skip"
                   else "with no loss token left after truncation")
            lines.append(f"{s['skipped']} examples {why} skipped (policy --truncation {policy})")
        return lines

    @classmethod
    def build(
        cls,
        train_path: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        options: SFTOptions,
        *,
        val_path: str | Path | None = None,
        seed: int = 0,
    ) -> "SFTDataset":
        """Read, validate and tokenize ``train_path`` (and ``val_path``), apply the truncation policy, split.

        An example may hold at most ``seq_len + 1`` tokens: its first token is only ever an input and its last only a
        label, so it fills at most ``seq_len`` positions of a row. A longer one is cut to its first ``seq_len + 1``
        tokens (``truncate``; dropped when no loss token remains) or dropped (``skip``). Without ``val_path`` a seeded
        random ``val_fraction`` of the kept examples (at least 1) is held out. Raises `DataError` for bad data, for
        fewer than 2 usable examples to split, and when no training example has a loss token.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        max_tokens = seq_len + 1
        counts = {"truncated": 0, "skipped": 0}
        encode = _Tokenizer(tokenizer, options)

        def load(path: str | Path) -> tuple[list[TokenizedExample], list[Example]]:
            examples = read_examples(path, options.format)
            kept = []
            for ex in examples:
                tok = encode(ex)
                if len(tok.ids) > max_tokens:
                    if options.truncation == "skip":
                        counts["skipped"] += 1
                        continue
                    tok = TokenizedExample(tok.ids[:max_tokens], tok.loss[:max_tokens], tok.source,
                                           min(tok.prompt_len, max_tokens), tok.answer, truncated=True)
                    if not tok.loss.any():
                        counts["skipped"] += 1
                        continue
                    counts["truncated"] += 1
                kept.append(tok)
            return kept, examples

        train, records = load(train_path)
        if not train:  # every kept example has a loss token, so this is "no loss token anywhere"
            raise DataError(f"{train_path}: no example has a loss token after --truncation {options.truncation} at "
                            f"seq_len {seq_len} ({counts['skipped']} of {len(records)} skipped)")
        fmt = records[0].format
        n_read = len(records)
        notes = []
        if val_path is not None:
            val, val_records = load(val_path)
            n_read += len(val_records)
            split = f"validation from {val_path}"
        elif options.val_fraction == 0:
            val, split = [], "no validation split (--val-fraction 0)"
        else:
            if len(train) < 2:
                raise DataError(f"{train_path}: {len(train)} usable example(s): at least 2 are needed to hold one out "
                                "for validation (pass --val-data, or --val-fraction 0)")
            n_val = min(len(train) - 1, max(1, round(options.val_fraction * len(train))))
            held = set(np.random.default_rng(seed).permutation(len(train))[:n_val].tolist())
            val = [ex for i, ex in enumerate(train) if i in held]  # both splits keep the file order
            train = [ex for i, ex in enumerate(train) if i not in held]
            split = f"validation: {n_val} held out at random (--val-fraction {options.val_fraction}, seed {seed})"
        renderer = encode.template_used
        notes.append(f"data: {n_read} {fmt} examples from {train_path}; {split}")
        if renderer is not None:
            how = "its {% generation %} markers" if renderer.has_markers else "message-prefix renderings"
            notes.append(f"chat template: {renderer.description}; assistant spans from {how}")
        stats = {
            "format": fmt,
            "examples": n_read,
            "train_examples": len(train),
            "val_examples": len(val),
            "truncated": counts["truncated"],
            "skipped": counts["skipped"],
            "truncation": options.truncation,
            "max_tokens": max_tokens,
            "loss_tokens": sum(ex.n_loss for ex in train),
            "tokens": sum(len(ex.ids) for ex in train),
            "train_on_prompt": options.train_on_prompt,
        }
        source = str(train_path) + (f" (validation {val_path})" if val_path is not None else "")
        return cls(train, val, source=source, stats=stats, notes=notes)


# ----------------------------------------------------------------------------------------------- batching


@dataclass
class SFTStream:
    """What a training loop reads off ``batcher.stream`` (as of a `TokenStream`): a label and the vocabulary bound."""

    source: str
    vocab_size: int | None


class _Rows:
    """Per-example row pieces of one split: inputs ``ids[:-1]``, shifted labels, lengths, loss counts."""

    def __init__(self, examples: Sequence[TokenizedExample], seq_len: int) -> None:
        self.inputs = [ex.ids[:-1].astype(np.int64) for ex in examples]
        self.labels = [np.where(ex.loss[1:], ex.ids[1:], IGNORE_INDEX).astype(np.int64) for ex in examples]
        self.lengths = np.array([len(ex.ids) - 1 for ex in examples], dtype=np.int64)
        self.loss = np.array([int(ex.loss[1:].sum()) for ex in examples], dtype=np.int64)
        too_long = np.flatnonzero(self.lengths > seq_len)
        if too_long.size:
            ex = examples[int(too_long[0])]
            raise ValueError(f"{ex.source}: example of {len(ex.ids)} tokens does not fit seq_len {seq_len} (the data "
                             "was built for a longer seq_len)")
        if (self.lengths < 1).any():
            raise ValueError("an example of fewer than 2 tokens has no target")


def _pack(order: np.ndarray, lengths: np.ndarray, seq_len: int, packing: bool) -> list[np.ndarray]:
    """Rows of example indices: next-fit in ``order`` (a row is closed when the next example does not fit), or one
    example per row when not packing. A row never splits an example."""
    if not packing:
        return [order[i : i + 1] for i in range(len(order))]
    rows, start, fill = [], 0, 0
    for i, idx in enumerate(order.tolist()):
        n = int(lengths[idx])
        if fill + n > seq_len:
            rows.append(order[start:i])
            start, fill = i, 0
        fill += n
    rows.append(order[start:])
    return rows


class SFTBatcher:
    """Deterministic, resumable, data-parallel batches of fine-tuning examples; the public interface of
    `TokenBatcher`, plus position ids and the global loss-token count of a step (`step_batches`).

    An example of n tokens fills n - 1 positions: inputs ``ids[:-1]``, labels ``ids[1:]`` where ``loss[1:]``, else
    -100 (labels are *already shifted*: ``labels[r, t]`` is the target of position t, as in `TokenBatcher`). Each
    epoch orders the training examples by a permutation seeded by ``(seed, epoch)`` and packs them, in that order,
    into rows of ``seq_len`` positions (next-fit; an example is never split); position ids restart at 0 for every
    example, so transformers' sdpa / eager attention (no attention mask, ``use_cache=False``) keeps each example to
    itself and rotary / learned positions are those of the example alone. The row's tail is padding (``pad_id``,
    label -100). Padding mode (``packing=False``): one example per row, position ids ``arange(seq_len)``.

    Epochs follow each other seamlessly; the position (``epoch``, ``cursor`` = rows of that epoch consumed) is global
    and the same on every rank; each step consumes ``micro_batch * world_size`` rows, rank k getting rows
    ``[k * micro_batch, (k + 1) * micro_batch)`` of them. Rows of an epoch are computed from lengths only and cached.
    """

    def __init__(
        self,
        data: SFTDataset,
        seq_len: int,
        micro_batch: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        packing: bool = True,
        pad_id: int = 0,
    ) -> None:
        if seq_len < 1 or micro_batch < 1:
            raise ValueError(f"seq_len and micro_batch must be positive, got {seq_len}, {micro_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if not data.train:
            raise ValueError("no training examples")
        self.data = data
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.packing = packing
        self.pad_id = int(pad_id)
        self.stream = SFTStream(data.source, data.vocab_size)
        self._train = _Rows(data.train, seq_len)
        self._val = _Rows(data.val, seq_len)
        self._val_rows = _pack(np.arange(len(data.val)), self._val.lengths, seq_len, packing) if data.val else []
        self.epoch = 0
        self.cursor = 0  # rows of the current epoch already consumed (globally, by all ranks together)
        self._epoch_cache: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Rows consumed per step across all ranks: ``micro_batch * world_size``."""
        return self.micro_batch * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """Row positions (real tokens and padding) consumed per step by all ranks together."""
        return self.global_batch * self.seq_len

    @property
    def n_windows(self) -> int:
        """Rows of the current epoch (packing: varies with the epoch's order)."""
        return len(self._epoch(self.epoch)[0])

    # -- order -------------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Rows of ``epoch`` (example indices each) and their loss-token counts ``[rows]``."""
        cached = self._epoch_cache.get(epoch)
        if cached is None:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
            order = torch.randperm(len(self.data.train), generator=gen).numpy()
            rows = _pack(order, self._train.lengths, self.seq_len, self.packing)
            loss = np.array([int(self._train.loss[r].sum()) for r in rows], dtype=np.int64)
            # Older epochs are never read again; a step may look a few epochs ahead of the current one.
            self._epoch_cache = {k: v for k, v in self._epoch_cache.items() if k >= self.epoch}
            cached = self._epoch_cache[epoch] = (rows, loss)
        return cached

    def _locate(self, first: int, count: int) -> list[tuple[int, int]]:
        """(epoch, row) at global positions ``first .. first + count - 1`` counted from the current epoch's start."""
        epoch, pos = self.epoch, first
        while pos >= len(self._epoch(epoch)[0]):
            pos -= len(self._epoch(epoch)[0])
            epoch += 1
        out = []
        for _ in range(count):
            out.append((epoch, pos))
            pos += 1
            if pos == len(self._epoch(epoch)[0]):
                epoch, pos = epoch + 1, 0
        return out

    def _advance(self, rows: int) -> None:
        self.cursor += rows
        while self.cursor >= self.n_windows:
            self.cursor -= self.n_windows
            self.epoch += 1

    def _build(self, split: _Rows, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, labels, position_ids)`` of ``rows`` (example indices each), int64 ``[len(rows), seq_len]``."""
        inputs = np.full((len(rows), self.seq_len), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), self.seq_len), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((len(rows), self.seq_len), dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for idx in row.tolist():
                n = int(split.lengths[idx])
                inputs[r, at : at + n] = split.inputs[idx]
                labels[r, at : at + n] = split.labels[idx]
                positions[r, at : at + n] = np.arange(n)
                at += n
            # The padding run gets its own positions 0.. (packing), so it reads as one more sequence: transformers'
            # packed-sequence detection (a position that is not previous + 1 starts a sequence) and flash-attention's
            # varlen boundaries keep it out of the last example's attention span instead of extending that example.
            # In padding mode the positions just continue (arange): one example + trailing pads is plain causal.
            positions[r, at:] = np.arange(self.seq_len - at) + (0 if self.packing else at)
        return torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(positions)

    # -- training batches --------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's next ``(input_ids, labels, position_ids)``, each int64 ``[micro_batch, seq_len]``; advances the
        position by one global batch."""
        where = self._locate(self.cursor + self.rank * self.micro_batch, self.micro_batch)
        batch = self._build(self._train, [self._epoch(e)[0][r] for e, r in where])
        self._advance(self.global_batch)
        return batch

    def step_batches(self, grad_accum: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
        """This rank's ``grad_accum`` micro-batches of the next optimizer step, and the number of loss tokens
        (labels != -100) of the whole step: all its micro-batches on all ranks. Every rank computes the same number
        from the row layout alone (no communication); dividing each rank's summed loss by it makes the gradient
        independent of packing, accumulation and world size."""
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be positive, got {grad_accum}")
        rows = self._locate(self.cursor, grad_accum * self.global_batch)
        total = sum(int(self._epoch(e)[1][r]) for e, r in rows)
        return [self.next_batch() for _ in range(grad_accum)], total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.next_batch()

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Data position (global, identical on every rank) plus what must match for it to be meaningful."""
        return {
            "kind": "sft",
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "packing": self.packing,
            "n_examples": len(self.data.train),
            "fingerprint": self.data.fingerprint,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. World size and micro batch may differ (the cursor counts rows); the training examples
        (tokens and masks), ``seq_len`` and the packing mode must be the same, or the cursor would point elsewhere."""
        if state.get("kind") != "sft":
            raise ValueError("data state is not a fine-tuning data position (it comes from a pre-training run)")
        mine = {"seq_len": self.seq_len, "packing": self.packing, "n_examples": len(self.data.train),
                "fingerprint": self.data.fingerprint}
        diff = [f"{k} {state.get(k)!r} vs {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError(f"data state does not fit this data ({'; '.join(diff)}): the data, its tokenization, "
                             "seq_len or --packing changed")
        seed, epoch, cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        old = self.seed, self.epoch, self.cursor
        self.seed, self.epoch, self._epoch_cache = seed, epoch, {}  # the row layout depends on (seed, epoch)
        if epoch < 0 or not 0 <= cursor < self.n_windows:
            self.seed, self.epoch, self.cursor = old
            self._epoch_cache = {}
            raise ValueError(f"data state position epoch {epoch} cursor {cursor} out of range")
        self.cursor = cursor

    # -- validation --------------------------------------------------------------------------------
    def n_val_windows(self, seq_len: int | None = None) -> int:
        """Validation rows (the validation examples in order, packed or padded like training)."""
        self._check_seq_len(seq_len)
        return len(self._val_rows)

    def _check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f"fine-tuning rows are built for seq_len {self.seq_len}, not {seq_len}")

    def val_batches(
        self, batch: int, seq_len: int | None = None, *, shard: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Deterministic pass over the validation rows: ``(input_ids, labels, position_ids)`` int64
        ``[<= batch, seq_len]``. Never touches the training position. Rows hold different numbers of loss tokens:
        average the loss over tokens, not over batches.

        ``shard=False``: every rank sees every row (the last batch may be short). ``shard=True``: global batches of
        ``batch * world_size`` rows split by rank; only full global batches, so every rank yields the same number of
        equally sized batches (safe for collectives in lockstep).
        """
        self._check_seq_len(seq_len)
        total = len(self._val_rows)
        if shard:
            step = batch * self.world_size
            for start in range(0, total - step + 1, step):
                first = start + self.rank * batch
                yield self._build(self._val, self._val_rows[first : first + batch])
        else:
            for start in range(0, total, batch):
                yield self._build(self._val, self._val_rows[start : start + batch])

    def val_prompts(self, n: int) -> list[TokenizedExample]:
        """The first ``n`` validation examples with a reference answer and a prompt that fits (in order): generate
        from ``ids[:prompt_len]`` and compare with ``answer``."""
        picked = [ex for ex in self.data.val if ex.answer is not None and 0 < ex.prompt_len < len(ex.ids)]
        return picked[:n]
