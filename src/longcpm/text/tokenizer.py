"""Tokenizer for MiniCPM-family checkpoints, matching HF's slow LlamaTokenizer (legacy mode).

The checkpoint ships a SentencePiece BPE model plus added special tokens (ChatML markers). Encoding splits the
text on added-token strings first, SentencePiece-encodes the rest unchanged (the model's normalizer adds no
dummy prefix), then prepends BOS. A folder with a ``tokenizer.json`` is served by the ``tokenizers`` package
instead, as HF fast tokenizers would.
"""

from __future__ import annotations

import json
import operator
import re
import shutil
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import TokenizerError

# Files that together define a tokenizer; save() copies whichever of them the source folder had.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json",
                   "special_tokens_map.json", "chat_template.jinja")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict:
    """A missing optional file reads as {}; a broken one is the user's problem to fix, so say which."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _content(value: Any) -> str | None:
    """Token fields are either a plain string or an AddedToken-style dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _int_ids(value: Any) -> set[int]:
    """generation_config/config.json ids are an int or a list of ints."""
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}


class _SentencePieceBackend:
    """Base vocabulary from tokenizer.model; the Tokenizer handles added tokens around it."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError, ValueError) as e:
            raise TokenizerError(f"cannot load SentencePiece model {path}: {e}") from None
        self.size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if ids else ""

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.size else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None


class _TokenizersBackend:
    """tokenizer.json through the `tokenizers` package; it splits added tokens and decodes by itself."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self.tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"cannot load {path}: {e}") from None
        self.size = self.tok.get_vocab_size(with_added_tokens=True)

    def register(self, content: str, token_id: int, info: Mapping[str, Any], special: bool) -> None:
        """Make the config's added tokens atomic in the library too (re-adding a known one changes nothing)."""
        from tokenizers import AddedToken

        flags = {k: bool(info.get(k, False)) for k in ("lstrip", "rstrip", "single_word")}
        added = AddedToken(content, normalized=bool(info.get("normalized", not special)), special=special, **flags)
        (self.tok.add_special_tokens if special else self.tok.add_tokens)([added])
        if self.tok.token_to_id(content) != token_id:
            raise TokenizerError(f"added token {content!r} is id {token_id} in the config but not in tokenizer.json")
        self.size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class Tokenizer:
    """Encode/decode text and render chat prompts for one checkpoint folder."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer folder not found: {path}")
        cfg = _read_json(path / "tokenizer_config.json")
        smap = _read_json(path / "special_tokens_map.json")
        if (path / "tokenizer.json").is_file():
            self._backend: _SentencePieceBackend | _TokenizersBackend = _TokenizersBackend(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            self._backend = _SentencePieceBackend(path / "tokenizer.model")
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {path}")
        self._files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
        sp_defaults = isinstance(self._backend, _SentencePieceBackend)  # then LlamaTokenizer's defaults apply
        defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} if sp_defaults else {}
        self._tokens = {k: _content(cfg.get(k, smap.get(k, defaults.get(k)))) for k in _SPECIAL_KEYS}
        extra = cfg.get("additional_special_tokens") or smap.get("additional_special_tokens") or []
        special_names = {t for t in self._tokens.values() if t} | {c for c in map(_content, extra) if c}

        # Added tokens: the config's added_tokens_decoder, then legacy added_tokens.json, then bare special names.
        self._added: dict[str, int] = {}
        self._special_ids: set[int] = set()
        info_by_id: dict[int, Mapping[str, Any]] = {}
        decoder = cfg.get("added_tokens_decoder") or {}
        for key, info in (decoder.items() if isinstance(decoder, dict) else [("?", None)]):
            content = _content(info) if isinstance(info, dict) else None
            if content is None or not str(key).isdigit():
                raise TokenizerError(f"bad added_tokens_decoder entry {key!r} in {path / 'tokenizer_config.json'}")
            self._added[content] = int(key)
            info_by_id[int(key)] = info
            if info.get("special", content in special_names):
                self._special_ids.add(int(key))
        for content, i in _read_json(path / "added_tokens.json").items():
            if not isinstance(i, int):
                raise TokenizerError(f"bad id for {content!r} in {path / 'added_tokens.json'}")
            self._added.setdefault(content, i)
        for content in special_names:
            i = self._added.get(content, self._backend.token_to_id(content))
            if i is None:
                raise TokenizerError(f"special token {content!r} is not in the vocabulary of {path}")
            self._added[content] = i
        self._special_ids |= {i for c, i in self._added.items() if c in special_names}
        self._id_to_added = {i: c for c, i in self._added.items()}
        if isinstance(self._backend, _TokenizersBackend):
            for content, i in sorted(self._added.items(), key=lambda kv: kv[1]):
                self._backend.register(content, i, info_by_id.get(i, {}), i in self._special_ids)
        self._strip = {c: (bool(info_by_id.get(i, {}).get("lstrip")), bool(info_by_id.get(i, {}).get("rstrip")))
                       for c, i in self._added.items()}
        pattern = "|".join(re.escape(c) for c in sorted(self._added, key=len, reverse=True))
        self._split_re = re.compile(f"({pattern})") if pattern else None
        self._vocab_size = max([self._backend.size - 1, *self._added.values()]) + 1

        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.unk_token_id = self._id_of("unk_token")
        add_bos = cfg["add_bos_token"] if "add_bos_token" in cfg else (sp_defaults or self._probe_adds_bos())
        self.add_bos_token = bool(add_bos) and self.bos_token_id is not None
        self.add_eos_token = bool(cfg.get("add_eos_token", False)) and self.eos_token_id is not None

        gen, model_cfg = _read_json(path / "generation_config.json"), _read_json(path / "config.json")
        eos = _int_ids(gen.get("eos_token_id")) | _int_ids(model_cfg.get("eos_token_id"))
        self.eos_token_ids = frozenset(eos | ({self.eos_token_id} if self.eos_token_id is not None else set()))
        # MiniCPM4's tokenizer has no pad token; fall back to generation_config's (then config.json's) pad id.
        pads = [self._id_of("pad_token")] + [min(_int_ids(c.get("pad_token_id")) or [-1]) for c in (gen, model_cfg)]
        self.pad_token_id: int | None = next((p for p in pads if p is not None and p >= 0), None)
        self.chat_template = self._load_chat_template(cfg)
        self._compiled_template: Any = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        return cls(path)

    # ----------------------------------------------------------------------------------------- basics
    def _id_of(self, key: str) -> int | None:
        token = self._tokens.get(key)
        return None if token is None else self._added.get(token)

    def _probe_adds_bos(self) -> bool:
        """tokenizer.json without an add_bos_token setting: ask its post-processor."""
        tok = self._backend.tok  # type: ignore[union-attr]
        with_special = tok.encode("a", add_special_tokens=True).ids
        plain = tok.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(plain) and with_special[0] == self._id_of("bos_token")

    def _load_chat_template(self, cfg: dict) -> str | None:
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                return jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read {jinja_file}: {e}") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        """Base pieces plus added tokens (73448 for MiniCPM4), i.e. HF's len(tokenizer)."""
        return self._vocab_size

    @property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(self._special_ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if not isinstance(ids, Iterable):
            return self._token_of(self._check_id(ids))
        return [self._token_of(self._check_id(i)) for i in ids]

    def _token_of(self, i: int) -> str:
        token = self._id_to_added.get(i)
        token = token if token is not None else self._backend.id_to_token(i)
        if token is None:
            raise TokenizerError(f"token id {i} has no token in this vocabulary")
        return token

    def _check_id(self, i: Any) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise TokenizerError(f"token ids must be integers, got {type(i).__name__}") from None
        if not 0 <= i < self._vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{self._vocab_size - 1})")
        return i

    # ----------------------------------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids; added/special token strings in the text always become their single ids (as HF does)."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        if isinstance(self._backend, _TokenizersBackend):
            ids = self._backend.encode(text)
        else:
            ids = self._encode_sentencepiece(text)
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos_token else []) + ids
            ids += [self.eos_token_id] if self.add_eos_token else []
        return ids

    def _encode_sentencepiece(self, text: str) -> list[int]:
        parts = self._split_re.split(text) if self._split_re else [text]
        # re.split with one group alternates: text, token, text, token, ..., text
        for k in range(1, len(parts), 2):
            lstrip, rstrip = self._strip[parts[k]]
            if lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
            if rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
        ids: list[int] = []
        for k, part in enumerate(parts):
            ids.extend([self._added[part]] if k % 2 else self._backend.encode(part))
        return ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids to text: byte-fallback pieces are joined into UTF-8, added tokens appear verbatim unless skipped."""
        ids = [self._check_id(i) for i in (ids if isinstance(ids, Iterable) else [ids])]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        if isinstance(self._backend, _TokenizersBackend):
            return self._backend.tok.decode(ids, skip_special_tokens=False)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._id_to_added:
                out.append(self._backend.decode(run))
                out.append(self._id_to_added[i])
                run = []
            elif i < self._backend.size:
                run.append(i)
            else:
                raise TokenizerError(f"token id {i} has no token in this vocabulary")
        out.append(self._backend.decode(run))
        return "".join(out)

    # ----------------------------------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        add_special_tokens: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the checkpoint's Jinja template; BOS is added only if add_special_tokens asks."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.path} has no chat_template, so chat prompts cannot be built")
        _check_messages(messages)
        from jinja2.exceptions import TemplateError

        try:
            if self._compiled_template is None:
                self._compiled_template = _jinja_env().from_string(self.chat_template)
            specials = {k: v for k, v in self._tokens.items() if v is not None}
            text = self._compiled_template.render(
                **{**specials, **kwargs}, messages=messages, add_generation_prompt=add_generation_prompt
            )
        except (TemplateError, TypeError, ValueError) as e:
            raise TokenizerError(f"chat template of {self.path} failed: {e}") from None
        return self.encode(text, add_special_tokens=add_special_tokens) if tokenize else text

    # ----------------------------------------------------------------------------------------- save
    def save(self, path: str | Path) -> Path:
        """Copy the tokenizer files into `path` (created if needed), e.g. next to freshly written tiny weights."""
        dest = Path(path)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for src in self._files:
                target = dest / src.name
                if not (target.exists() and target.samefile(src)):
                    shutil.copyfile(src, target)
        except OSError as e:
            raise TokenizerError(f"cannot save tokenizer to {dest}: {e}") from None
        return dest


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"chat message {n} must be a dict, got {type(m).__name__}")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                raise TokenizerError(f"chat message {n} needs a string {field!r}")
        if not m["role"]:
            raise TokenizerError(f"chat message {n} has an empty role")


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template rejected the messages: {message}")


def _jinja_env() -> Any:
    """Sandboxed like HF: templates come from downloaded files, so they must not reach Python internals."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent, **kw)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder."""
    return Tokenizer(path)
