"""Fine-tuning data (`qgalore_dist.data.sft`): formats, bad-data messages, chat-template loss masks, truncation,
splits, and `SFTBatcher`'s packing / padding / data-parallel / resume semantics (CPU, a few seconds).

The tokenizer is the project's byte-level BPE trained in-process on a few lines (vocab 300), so nothing is
downloaded and no corpus package is needed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgalore_dist.data import DataError, get_tokenizer
from qgalore_dist.data.sft import (
    DEFAULT_CHAT_TEMPLATE,
    ChatRenderer,
    SFTBatcher,
    SFTDataset,
    SFTOptions,
    TokenizedExample,
    extract_answer,
    read_examples,
    resolve_chat_template,
)

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
EOS = "<|endoftext|>"
# Blank-line runs teach the BPE a "\n\n" token, as real byte-level BPEs have (see test_token_prefix_method).
TEXT = """What is two plus two? It is four. The answer follows the marks.


Be brief. Answer the question. Translate the word into French. Reverse the string.


<|im_start|>user <|im_end|> <|start_header_id|>assistant<|end_header_id|> <|eot_id|> [INST] [/INST] <<SYS>>
"""


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    """A tiny byte-level BPE (the project's recipe) with ``<|endoftext|>`` as BOS / EOS / pad and no chat template."""
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text(TEXT * 20)
    tokenizer = get_tokenizer(vocab_size=300, corpus=root / "corpus.txt", cache_dir=root / "cache")
    assert tokenizer.chat_template is None and tokenizer.eos_token == EOS
    return tokenizer


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is four. #### 4"},
    {"role": "user", "content": "Reverse the string."},
    {"role": "assistant", "content": "gnirts"},
]
RECORDS = {
    "prompt_completion": {"prompt": "What is two plus two?", "completion": " It is four. #### 4"},
    "alpaca": {"instruction": "Translate the word into French.", "input": "cat", "output": "chat", "answer": "chat"},
    "chat": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is two plus two?"},
                                   {"from": "gpt", "value": "four #### 4"}], "system": "Be brief."},
}


# ----------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize("layout", ["jsonl", "json", "folder"])
def test_formats_detected_and_explicit(tmp_path: Path, fmt: str, layout: str) -> None:
    records = [RECORDS[fmt]] * 3
    if layout == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", records)
    elif layout == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records, indent=2))
    else:
        path = tmp_path / "folder"
        (path / "sub").mkdir(parents=True)
        write_jsonl(path / "b.jsonl", records[:2])
        write_jsonl(path / "sub" / "c.jsonl", records[2:])
        (path / ".hidden.jsonl").write_text("not json\n")  # hidden files are ignored
        (path / "notes.txt").write_text("ignored\n")
    for requested in ("auto", fmt):
        examples = read_examples(path, requested)
        assert [e.format for e in examples] == [fmt] * 3
    if layout == "json":  # each element's own line: "[", then 2 + (lines of one pretty-printed record) apart
        per = len(json.dumps(records[0], indent=2).splitlines())
        assert [e.source for e in examples] == [f"{path}:{2 + i * per}" for i in range(3)]
    elif layout == "folder":
        assert [e.source for e in examples] == [f"{path / 'b.jsonl'}:1", f"{path / 'b.jsonl'}:2",
                                                f"{path / 'sub' / 'c.jsonl'}:1"]
    else:
        assert [e.source for e in examples] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_record_contents(tmp_path: Path) -> None:
    pc, al, ch, sg = (read_examples(write_jsonl(tmp_path / f"{k}.jsonl", [r]))[0] for k, r in RECORDS.items())
    assert not pc.is_chat and (pc.prompt, pc.completion) == ("What is two plus two?", " It is four. #### 4")
    assert al.messages == (("user", "Translate the word into French.\n\ncat"), ("assistant", "chat"))
    assert al.answer == "chat"
    assert ch.messages == tuple((m["role"], m["content"]) for m in CHAT)
    assert sg.messages == (("system", "Be brief."), ("user", "What is two plus two?"), ("assistant", "four #### 4"))
    alpaca = {"instruction": "I", "input": "", "output": "O", "system": "S", "history": [["q", "a"]]}
    ex = read_examples(write_jsonl(tmp_path / "h.jsonl", [alpaca, {**alpaca, "input": None}]))
    assert ex[0].messages == ex[1].messages == (("system", "S"), ("user", "q"), ("assistant", "a"), ("user", "I"),
                                                ("assistant", "O"))
    conv = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                       {"role": "user", "content": "q2"}], "completion": "a2"}
    ex = read_examples(write_jsonl(tmp_path / "c.jsonl", [conv]))[0]
    assert ex.is_chat and ex.trained_from == 3 and ex.messages[-1] == ("assistant", "a2")
    sg_alias = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}
    assert read_examples(write_jsonl(tmp_path / "s.jsonl", [sg_alias]))[0].messages == (("user", "q"),
                                                                                       ("assistant", "a"))


def test_blank_lines_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    line = json.dumps(RECORDS["alpaca"])
    path.write_bytes(("\ufeff" + line + "\r\n\r\n   \n" + line + "\r\n").encode())
    assert [e.source for e in read_examples(path)] == [f"{path}:1", f"{path}:4"]


BAD = [  # (file name, content, bad line, what the message must say)
    ("a.jsonl", '{"prompt": "p", "completion": "c"}\n\n{"prompt": "p", "completion": \n', 3, "invalid JSON"),
    ("a.jsonl", '{"prompt": "p", "completion": "c"}\n[1, 2]\n', 2, "not a JSON object"),
    ("a.jsonl", '[1, 2]\n{"prompt": "p", "completion": "c"}\n', 1, "not a JSON object (got a list)"),
    ("a.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n', 2, "missing field 'completion'"),
    ("a.jsonl", '{"prompt": "p", "completion": 3}\n', 1, "'completion' must be a string, got a number"),
    ("a.jsonl", '{"prompt": "p", "completion": "c", "answer": [1]}\n', 1, "'answer' must be a string or a number"),
    ("a.jsonl", '{"prompt": "p", "completion": "  "}\n', 1, "empty 'completion'"),
    ("a.jsonl", '{"instruction": "i", "input": "x"}\n', 1, "missing field 'output'"),
    ("a.jsonl", '{"instruction": "i", "output": ""}\n', 1, "empty 'output'"),
    ("a.jsonl", '{"instruction": "i", "output": "o", "history": [["q"]]}\n', 1, "'history' must be a list"),
    ("a.jsonl", "\n\n  \n", 1, "empty file"),
    ("a.jsonl", "", 1, "empty file"),
    ("a.json", "[]", 1, "empty file"),
    ("a.jsonl", '{"text": "plain"}\n', 1, "cannot tell the data format"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n', 1,
     "unknown role 'bot' in messages[1] (allowed: system, user, assistant)"),
    ("a.jsonl", '{"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]}\n'
     '{"conversations": [{"from": "bot", "value": "a"}]}\n', 2,
     "unknown role 'bot' in conversations[0] (allowed: human, gpt, system, user, assistant)"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}\n', 1,
     "empty assistant content in messages[1]"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "q"}]}\n', 1, "no assistant turn"),
    ("a.jsonl", '{"messages": [{"role": "user"}]}\n', 1, "missing field 'content' in messages[0]"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": ["x"]}]}\n', 1, "must be a string, got a list"),
    ("a.jsonl", '{"messages": []}\n', 1, "'messages' is an empty list"),
    ("a.jsonl", '{"messages": "hi"}\n', 1, "must be a list of messages"),
    ("a.jsonl", '{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "q"}]}\n',
     1, "'completion' has no assistant turn"),
    ("a.json", '[\n  {"prompt": "p", "completion": "c"},\n\n  {"prompt": "p",\n   "completion": ""}\n]', 4,
     "empty 'completion'"),
    ("a.json", '[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "p" "completion": "c"}\n]', 3,
     "invalid JSON"),
    ("a.json", '[\n  {"prompt": "p", "completion": "c"}\n  {"prompt": "p", "completion": "c"}\n]', 3,
     "expected ',' or ']'"),
    ("a.json", '[\n  {"prompt": "p", "completion": "c"}\n]\n{}', 4, "extra data after the list"),
    ("a.json", '[\n  {"prompt": "p", "completion": "c"},\n', 3, "invalid JSON"),
    ("a.json", '{\n  "prompt": "p", "completion": "c"\n}\n', 1, "must hold a list of records"),
]


@pytest.mark.parametrize(("name", "content", "line", "what"), BAD)
def test_bad_data_reports_file_and_line(tmp_path: Path, name: str, content: str, line: int, what: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert what in message, message


def test_bad_utf8_line_and_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c"}\n\n{"prompt": "\xff", "completion": "c"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        read_examples(path)
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"must be a \.jsonl or \.json file"):
        read_examples(tmp_path / "d.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl or .json files"):
        read_examples(tmp_path / "empty")
    folder = tmp_path / "f"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [RECORDS["chat"]])
    write_jsonl(folder / "b.jsonl", [RECORDS["alpaca"]])  # every file must fit the format detected first
    with pytest.raises(DataError, match=rf"^{folder / 'b.jsonl'}:1: missing field 'messages' \(format chat\)"):
        read_examples(folder)
    with pytest.raises(ValueError, match="--format"):
        read_examples(folder, "csv")


BAD_LINES = [
    ('{"instruction": "i", "output": "o"', "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('"just a string"', "not a JSON object"),
    ('{"instruction": "i"}', "missing field 'output'"),
    ('{"instruction": 7, "output": "o"}', "must be a string"),
    ('{"instruction": "i", "output": " "}', "empty 'output'"),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.sampled_from([json.dumps(RECORDS["alpaca"]), "", "   "]), max_size=12),
    bad=st.sampled_from(BAD_LINES),
    at=st.integers(min_value=0, max_value=12),
)
def test_random_bad_line_is_reported_at_its_line(lines: list[str], bad: tuple[str, str], at: int) -> None:
    at = min(at, len(lines))
    content = lines[:at] + [bad[0]] + lines[at:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("\n".join(content) + "\n")
        with pytest.raises(DataError) as info:
            read_examples(path)
    assert str(info.value).startswith(f"{path}:{at + 1}: "), str(info.value)
    assert bad[1] in str(info.value)


def test_extract_answer() -> None:
    assert extract_answer("so 2 + 2 = 4\n#### 4") == "4"
    assert extract_answer("#### 1 #### 72<|im_end|><|endoftext|>") == "72"
    assert extract_answer("#### a b \nmore") == "a b"
    assert extract_answer(" #### 5 </s>") == "5"
    assert extract_answer("no marks") is None and extract_answer("####  ") is None


# ----------------------------------------------------------------------------------------------- tokenizing


def spans(tok, ex: TokenizedExample) -> list[str]:
    """Decoded text of each run of loss tokens."""
    mask = np.concatenate([[False], ex.loss, [False]])
    edges = np.flatnonzero(np.diff(mask.astype(np.int8)))
    return [tok.decode(ex.ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def build(tmp_path: Path, tok, records: list, seq_len: int = 400, **options) -> SFTDataset:
    path = write_jsonl(tmp_path / "train.jsonl", records)
    return SFTDataset.build(path, tok, seq_len, SFTOptions(**{"val_fraction": 0.0, **options}))


@pytest.mark.parametrize(("template", "ends"), [
    (None, ("", "<|im_end|>" + EOS)),  # the shipped default: {% generation %} markers
    ("llama3.jinja", ("", "<|eot_id|>")),  # Llama-3 headers, no markers: message prefixes
    ("llama2.jinja", (" ", " " + EOS)),  # Llama-2 / Mistral [INST], no markers: message prefixes
])
def test_assistant_masks(tmp_path: Path, tok, template: str | None, ends: tuple[str, str]) -> None:
    data = build(tmp_path, tok, [{"messages": CHAT}],
                 chat_template=str(TEMPLATES / template) if template else None)
    ex = data.train[0]
    contents = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert spans(tok, ex) == [ends[0] + c + ends[1] for c in contents]
    # the generation prompt of the last turn: everything before its first assistant token
    prompt = tok.decode(ex.ids[: ex.prompt_len].tolist())
    assert prompt.endswith({None: "<|im_start|>assistant\n", "llama3.jinja": "<|end_header_id|>\n\n",
                            "llama2.jinja": "Reverse the string. [/INST]"}[template])
    assert ex.answer is None  # the last assistant turn has no '####'
    renderer = ChatRenderer(tok, *resolve_chat_template(tok, TEMPLATES / template if template else None))
    assert renderer.has_markers == (template is None)
    assert any("chat template" in line for line in data.log_lines())


def test_shipped_template_is_the_default_and_chatml(tok) -> None:
    template, description = resolve_chat_template(tok)
    assert template == DEFAULT_CHAT_TEMPLATE.read_text() and "shipped default" in description
    text = ChatRenderer(tok, template, description).render([(m["role"], m["content"]) for m in CHAT[:2]],
                                                          add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_token_prefix_method(tok) -> None:
    """Without offsets (slow tokenizers) spans come from token-id prefixes: the same as the offset method where the
    tokenization is prefix-stable ([INST] style), refused where it is not (Llama-3's "\\n\\n" after a header
    tokenizes differently alone and before content) although the template itself is fine."""
    messages = [(m["role"], m["content"]) for m in CHAT]
    template = (TEMPLATES / "llama2.jinja").read_text()
    by_offsets = ChatRenderer(tok, template, "llama2", span_method="offsets").tokenize(messages, "x:1")
    assert ChatRenderer(tok, template, "llama2", span_method="tokens").tokenize(messages, "x:1") == by_offsets
    template = (TEMPLATES / "llama3.jinja").read_text()
    ChatRenderer(tok, template, "llama3", span_method="offsets").tokenize(messages, "x:1")
    with pytest.raises(DataError, match=r"^x:1: llama3 is not token-prefix-stable"):
        ChatRenderer(tok, template, "llama3", span_method="tokens").tokenize(messages, "x:1")


def test_template_refusals(tmp_path: Path, tok) -> None:
    unstable = str(TEMPLATES / "unstable.jinja")
    build(tmp_path, tok, [{"messages": CHAT[:3]}], chat_template=unstable)  # one assistant turn: stable
    with pytest.raises(DataError, match=rf"^{tmp_path / 'train.jsonl'}:2: .*unstable.jinja is not prefix-stable"):
        build(tmp_path, tok, [{"messages": CHAT[:3]}, {"messages": CHAT}], chat_template=unstable)
    empty_marks = tmp_path / "marks.jinja"
    empty_marks.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                           "{% generation %}{% endgeneration %}{% endfor %}")
    with pytest.raises(DataError, match=r"train.jsonl:1: the \{% generation %\} markers .* mark no token"):
        build(tmp_path, tok, [{"messages": CHAT}], chat_template=str(empty_marks))
    raising = tmp_path / "raise.jinja"
    raising.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                       "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match=r"train.jsonl:1: .*refused this conversation \(no system role\)"):
        build(tmp_path, tok, [{"messages": CHAT}], chat_template=str(raising))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(DataError, match=r"broken.jinja: chat template does not parse"):
        build(tmp_path, tok, [{"messages": CHAT}], chat_template=str(broken))
    with pytest.raises(DataError, match=r"missing.jinja: chat template file does not exist"):
        build(tmp_path, tok, [RECORDS["prompt_completion"]], chat_template=str(tmp_path / "missing.jinja"))
    first = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"}]}
    with pytest.raises(DataError, match="starts with an assistant turn"):
        build(tmp_path, tok, [first], chat_template=str(TEMPLATES / "llama3.jinja"))
    assert spans(tok, build(tmp_path, tok, [first]).train[0]) == ["hello<|im_end|>" + EOS]  # markers: fine


def test_prompt_completion_tokens(tmp_path: Path, tok) -> None:
    record = RECORDS["prompt_completion"]
    ex = build(tmp_path, tok, [record]).train[0]
    prompt = tok(record["prompt"])["input_ids"]
    completion = tok(record["completion"], add_special_tokens=False)["input_ids"]
    assert ex.ids.tolist() == prompt + completion + [tok.eos_token_id]
    assert ex.loss.tolist() == [False] * len(prompt) + [True] * (len(completion) + 1)
    assert ex.prompt_len == len(prompt) and ex.answer == "4"
    assert ex.ids.dtype == np.int32 and ex.loss.dtype == bool


def test_chat_prompt_completion_trains_only_the_completion(tmp_path: Path, tok) -> None:
    record = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "q2"}], "completion": "a2 #### 2"}
    ex = build(tmp_path, tok, [record]).train[0]
    assert spans(tok, ex) == ["a2 #### 2<|im_end|>" + EOS]
    assert ex.answer == "2"
    full = build(tmp_path, tok, [{"messages": record["prompt"] + [{"role": "assistant", "content": "a2 #### 2"}]}])
    assert spans(tok, full.train[0]) == ["a<|im_end|>" + EOS, "a2 #### 2<|im_end|>" + EOS]


def test_train_on_prompt(tmp_path: Path, tok) -> None:
    for record in (RECORDS["chat"], RECORDS["prompt_completion"]):
        ex = build(tmp_path, tok, [record], train_on_prompt=True).train[0]
        assert not ex.loss[0] and ex.loss[1:].all()


def test_truncation_and_skip(tmp_path: Path, tok) -> None:
    short = {"prompt": "Be brief.", "completion": " four"}
    long = {"prompt": "Be brief.", "completion": " It is four. " * 20}
    prompt_only = {"prompt": "Be brief. " * 30, "completion": " four"}  # its completion is cut away entirely
    n_short = len(build(tmp_path, tok, [short]).train[0].ids)
    seq_len = n_short + 3
    data = build(tmp_path, tok, [short, long, prompt_only, long], seq_len=seq_len)
    assert [len(e.ids) for e in data.train] == [n_short, seq_len + 1, seq_len + 1]
    assert [e.truncated for e in data.train] == [False, True, True]
    assert (data.stats["truncated"], data.stats["skipped"]) == (2, 1)
    lines = "\n".join(data.log_lines())
    assert f"2 examples longer than seq_len+1 ({seq_len + 1}) tokens truncated (policy --truncation truncate)" in lines
    assert "1 examples with no loss token left after truncation skipped" in lines
    data = build(tmp_path, tok, [short, long, prompt_only, long], seq_len=seq_len, truncation="skip")
    assert [len(e.ids) for e in data.train] == [n_short] and data.stats["skipped"] == 3
    assert f"3 examples longer than seq_len+1 ({seq_len + 1}) tokens skipped (policy --truncation skip)" in "\n".join(
        data.log_lines())
    with pytest.raises(DataError, match=rf"^{tmp_path / 'train.jsonl'}: no example has a loss token"):
        build(tmp_path, tok, [prompt_only], seq_len=seq_len)


def test_split_val_and_answers(tmp_path: Path, tok) -> None:
    records = [{"prompt": f"q{i}", "completion": f" a #### {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    options = SFTOptions(val_fraction=0.1)
    a = SFTDataset.build(path, tok, 64, options, seed=3)
    b = SFTDataset.build(path, tok, 64, options, seed=3)
    c = SFTDataset.build(path, tok, 64, options, seed=4)
    assert len(a.val) == 4 and len(a.train) == 36
    assert [e.source for e in a.val] == [e.source for e in b.val] != [e.source for e in c.val]
    assert sorted(e.source for e in a.train + a.val) == sorted(f"{path}:{i}" for i in range(1, 41))
    assert a.stats["examples"] == 40 and a.vocab_size == max(int(e.ids.max()) for e in a.train + a.val) + 1
    batcher = SFTBatcher(a, 64, 2)
    prompts = batcher.val_prompts(3)
    assert [p.source for p in prompts] == [e.source for e in a.val[:3]]
    assert [p.answer for p in prompts] == [str(int(p.source.rsplit(":", 1)[1]) - 1) for p in prompts]
    val = write_jsonl(tmp_path / "val.jsonl", [{"messages": CHAT[:3]}])  # its own format
    d = SFTDataset.build(path, tok, 64, options, val_path=val)
    assert len(d.train) == 40 and [e.source for e in d.val] == [f"{val}:1"] and d.val[0].answer == "4"
    one = write_jsonl(tmp_path / "one.jsonl", records[:1])
    with pytest.raises(DataError, match="at least 2 are needed"):
        SFTDataset.build(one, tok, 64, options)
    assert len(SFTDataset.build(one, tok, 64, SFTOptions(val_fraction=0)).val) == 0


def test_options_validation() -> None:
    for kwargs, flag in (({"format": "csv"}, "--format"), ({"truncation": "cut"}, "--truncation"),
                         ({"val_fraction": 1.0}, "--val-fraction"), ({"val_fraction": -0.1}, "--val-fraction")):
        with pytest.raises(ValueError, match=flag):
            SFTOptions(**kwargs)


# ----------------------------------------------------------------------------------------------- batching


def synthetic(n: int, seq_len: int, seed: int = 0, n_val: int = 5) -> SFTDataset:
    """Examples of 2..seq_len+1 tokens; token values start with 10 000 + index (so rows can be traced back to their
    example) and never equal the pad id 0; random loss masks with at least one target."""
    rng = np.random.default_rng(seed)

    def example(i: int) -> TokenizedExample:
        length = int(rng.integers(2, seq_len + 2))
        ids = rng.integers(1, 1000, length).astype(np.int32)
        ids[0] = 10_000 + i
        loss = rng.random(length) < 0.6
        loss[0] = False
        loss[rng.integers(1, length)] = True
        return TokenizedExample(ids, loss, f"synthetic:{i}", 1, str(i) if i % 2 else None)

    examples = [example(i) for i in range(n + n_val)]
    return SFTDataset(examples[:n], examples[n:], source="synthetic")


def rows_of_steps(batcher: SFTBatcher, steps: int) -> list[torch.Tensor]:
    return [torch.stack(batcher.next_batch()) for _ in range(steps)]  # each [3, micro_batch, seq_len]


def test_packing_invariants_one_epoch() -> None:
    seq_len, data = 16, synthetic(37, 16)
    batcher = SFTBatcher(data, seq_len, 1, seed=5, pad_id=0)
    rows = batcher.n_windows
    seen = []
    for _ in range(rows):
        ids, labels, pos = (t[0] for t in batcher.next_batch())
        starts = (pos == 0).nonzero().flatten().tolist() + [seq_len]
        assert starts[0] == 0
        for a, b in zip(starts[:-1], starts[1:]):
            assert torch.equal(pos[a:b], torch.arange(b - a))  # positions restart at every example
            if ids[a] == 0:  # the padding run: last in the row, no targets
                assert b == seq_len and (ids[a:b] == 0).all() and (labels[a:b] == -100).all()
                continue
            i = int(ids[a]) - 10_000
            ex = data.train[i]
            assert b - a == len(ex.ids) - 1  # the whole example, never split
            assert ids[a:b].tolist() == ex.ids[:-1].tolist()
            # labels stay inside the example: token t+1 of the same example where it is a target
            assert labels[a:b].tolist() == np.where(ex.loss[1:], ex.ids[1:], -100).tolist()
            seen.append(i)
    assert sorted(seen) == list(range(len(data.train)))  # every example (so every loss token) exactly once
    assert batcher.epoch == 1 and batcher.cursor == 0
    assert rows < len(data.train)  # it did pack


def test_padding_mode() -> None:
    seq_len, data = 12, synthetic(9, 12)
    batcher = SFTBatcher(data, seq_len, 3, packing=False, pad_id=7)
    assert batcher.n_windows == 9
    ids, labels, pos = batcher.next_batch()
    assert ids.shape == labels.shape == pos.shape == (3, seq_len)
    assert ids.dtype == labels.dtype == pos.dtype == torch.int64
    assert (pos == torch.arange(seq_len)).all()
    for r in range(3):
        ex = data.train[int(ids[r, 0]) - 10_000]
        n = len(ex.ids) - 1
        assert ids[r, :n].tolist() == ex.ids[:-1].tolist() and (ids[r, n:] == 7).all()
        assert (labels[r, n:] == -100).all() and labels[r, :n].tolist() == np.where(ex.loss[1:], ex.ids[1:],
                                                                                     -100).tolist()


@pytest.mark.parametrize("packing", [True, False])
def test_deterministic_and_seeded(packing: bool) -> None:
    data = synthetic(30, 16)
    a, b, c = (rows_of_steps(SFTBatcher(data, 16, 2, seed=s, packing=packing), 20) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("packing", [True, False])
def test_ranks_concatenate_to_the_global_batch_and_count_tokens(world: int, packing: bool) -> None:
    data, mb, accum = synthetic(23, 16), 2, 3
    single = SFTBatcher(data, 16, mb * world, seed=4, packing=packing)
    ranks = [SFTBatcher(data, 16, mb, world_size=world, rank=r, seed=4, packing=packing) for r in range(world)]
    for _ in range(6):  # several epochs: 23 examples make ~12 packed rows, a step takes 6-18
        want, want_count = single.step_batches(accum)
        got = [b.step_batches(accum) for b in ranks]
        assert {count for _, count in got} == {want_count}  # every rank computes the same global count
        for k in range(accum):
            for part in range(3):
                assert torch.equal(torch.cat([g[0][k][part] for g in got]), want[k][part])
        assert want_count == sum(int((labels != -100).sum()) for batches, _ in got for _, labels, _ in batches)
        assert len({(b.epoch, b.cursor) for b in ranks + [single]}) == 1
    assert single.epoch >= 2


def test_epochs_straddle_seamlessly() -> None:
    data = synthetic(20, 16)
    one = SFTBatcher(data, 16, 1, seed=9)
    stream = torch.cat([t[0] for t in rows_of_steps(one, 40)])  # 40 rows, one a step
    assert one.epoch >= 2  # ~20 examples pack into fewer than 20 rows: the stream crossed epoch boundaries
    big = SFTBatcher(data, 16, 7, seed=9)  # 7 rows a step divides no epoch: its batches straddle the boundaries
    flat = torch.cat([t[0] for t in rows_of_steps(big, 6)])[:40]
    assert torch.equal(stream, flat)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_mid_epoch(packing: bool) -> None:
    data = synthetic(25, 16)
    ref = SFTBatcher(data, 16, 2, world_size=2, rank=1, seed=3, packing=packing)
    rows_of_steps(ref, 3)
    state = ref.state_dict()
    assert 0 < state["cursor"] < ref.n_windows  # mid-epoch
    resumed = SFTBatcher(data, 16, 2, world_size=2, rank=1, seed=0, packing=packing)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for x, y in zip(rows_of_steps(ref, 15), rows_of_steps(resumed, 15)):
        assert torch.equal(x, y)
    # one rank with a global batch of 4 reads the same rows as world 2 x micro 2 (the cursor counts rows)
    single = SFTBatcher(data, 16, 4, seed=0, packing=packing)
    single.load_state_dict(ref.state_dict())
    ranks = [SFTBatcher(data, 16, 2, world_size=2, rank=r, packing=packing) for r in range(2)]
    for b in ranks:
        b.load_state_dict(ref.state_dict())
    assert torch.equal(single.next_batch()[0], torch.cat([b.next_batch()[0] for b in ranks]))
    with pytest.raises(ValueError, match="seq_len"):
        SFTBatcher(data, 17, 2, packing=packing).load_state_dict(state)
    with pytest.raises(ValueError, match="packing"):
        SFTBatcher(data, 16, 2, packing=not packing).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        SFTBatcher(synthetic(25, 16, seed=1), 16, 2, packing=packing).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        SFTBatcher(data, 16, 2, packing=packing).load_state_dict({**state, "cursor": 10_000})
    with pytest.raises(ValueError, match="pre-training"):
        SFTBatcher(data, 16, 2, packing=packing).load_state_dict({"epoch": 0, "cursor": 0})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_batches(world: int) -> None:
    data = synthetic(10, 16, n_val=13)
    whole = SFTBatcher(data, 16, 2, world_size=world, packing=False)
    assert whole.n_val_windows() == 13
    full = list(whole.val_batches(2))
    assert [len(b[0]) for b in full] == [2] * 6 + [1]
    rows = torch.cat([b[0] for b in full])
    assert [int(r[0]) - 10_000 for r in rows] == list(range(10, 23))  # file order
    shards = [list(SFTBatcher(data, 16, 2, world_size=world, rank=r, packing=False).val_batches(2, shard=True))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal counts on every rank
    n = len(shards[0])
    assert n == 13 // (2 * world)
    merged = torch.cat([shards[r][k][0] for k in range(n) for r in range(world)]) if n else rows[:0]
    assert torch.equal(merged, rows[: n * 2 * world])
    before = whole.state_dict()
    list(whole.val_batches(4))
    assert whole.state_dict() == before  # never touches the training position
    packed = SFTBatcher(data, 16, 2)
    assert packed.n_val_windows() < 13
    loss_tokens = sum(int((labels != -100).sum()) for _, labels, _ in packed.val_batches(3))
    assert loss_tokens == sum(int(e.loss[1:].sum()) for e in data.val)
    with pytest.raises(ValueError, match="seq_len"):
        list(packed.val_batches(2, 32))


def test_batcher_interface_and_errors() -> None:
    data = synthetic(10, 16)
    b = SFTBatcher(data, 16, 2, world_size=3, rank=2)
    assert (b.seq_len, b.micro_batch, b.world_size, b.rank, b.global_batch) == (16, 2, 3, 2, 6)
    assert b.stream.source == "synthetic" and b.stream.vocab_size == data.vocab_size == 10_000 + 15
    assert b.tokens_per_step == 6 * 16
    assert len(next(iter(b))) == 3
    with pytest.raises(ValueError, match="does not fit seq_len 8"):
        SFTBatcher(data, 8, 2)
    with pytest.raises(ValueError, match="rank"):
        SFTBatcher(data, 16, 2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="grad_accum"):
        b.step_batches(0)


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_end_to_end_loss_tokens(tmp_path: Path, tok, fmt: str) -> None:
    """Real records through the tokenizer and the batcher: one epoch of rows holds every loss token once."""
    path = write_jsonl(tmp_path / "train.jsonl", [RECORDS[fmt]] * 5)
    data = SFTDataset.build(path, tok, 128, SFTOptions(val_fraction=0.0))
    batcher = SFTBatcher(data, 128, 1, pad_id=tok.pad_token_id)
    total = sum(batcher.step_batches(1)[1] for _ in range(batcher.n_windows))
    assert total == data.stats["loss_tokens"] == sum(e.n_loss for e in data.train) > 0
    assert batcher.epoch == 1 and batcher.cursor == 0
