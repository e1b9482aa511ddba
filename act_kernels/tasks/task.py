"""Examples and task objects: prompt construction and the token ids that get scored.

Two kinds of task, following the evaluation protocols of the ACT reference code:

* ``"classification"``: prompt = ``instruction + template.format(**fields)`` (for instance
  ``"...\\n\\nSentence: {sentence} \\nSentiment: "``).  The prediction is the label word whose
  *last* token has the highest next-token logit among the label words' last tokens (the reference
  tokenizes each label word and keeps ``input_ids[-1]``).
* ``"multiple_choice"``: prompt = ``instruction + "\\n\\n" + question + "\\nA. ..." + "\\nB. ..." +
  "\\nAnswer:"``.  The prediction is the greedy next token (argmax over the whole vocabulary),
  correct when it is the gold answer letter (``"A"`` or ``" A"``: the reference decodes the token
  and compares strings).

Everything here is tokenizer-agnostic except :meth:`Task.option_token_ids`,
:meth:`Task.build_prompt` with ``chat_template=True`` and :meth:`Task.score_item`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

LETTERS = "ABCDEFG"

CLASSIFICATION = "classification"
MULTIPLE_CHOICE = "multiple_choice"


@dataclass(frozen=True)
class Example:
    """One evaluation example.

    ``id`` is unique within a task and stable across runs (it names the source, split and row),
    ``prompt`` is the reference prompt (no chat template, zero-shot), ``options`` are the label
    words (classification, with their leading spaces exactly as scored) or the answer texts
    (multiple choice), ``gold`` is the index of the right option, ``fields`` the normalised
    input fields the prompt was built from.
    """

    id: str
    task: str
    prompt: str
    options: tuple[str, ...]
    gold: int
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False)
    split: str = ""
    source: str = ""

    @property
    def letters(self) -> tuple[str, ...]:
        """Answer letters of a multiple-choice example (``("A", "B", ...)``)."""
        return tuple(LETTERS[: len(self.options)])


@dataclass(frozen=True)
class ScoreItem:
    """What :func:`act_kernels.tasks.score_last_logits` needs for one example.

    ``option_token_ids[k]`` lists the vocabulary ids that count as option ``k`` (one id for a
    classification label word, its last token; one or two ids for an answer letter, with and
    without a leading space).  ``kind`` selects the protocol.
    """

    kind: str
    option_token_ids: tuple[tuple[int, ...], ...]
    gold: int


def _last_token(tokenizer, text: str) -> tuple[int, int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{text!r} encodes to no token")
    return ids[-1], len(ids)


class Task:
    """A task: its name, kind, prompt format and data description.

    Attributes: ``name`` (canonical), ``kind`` (``"classification"`` | ``"multiple_choice"``),
    ``instruction``, ``template`` (classification), ``label_words`` (classification),
    ``aliases``, ``description``, ``option_format`` (multiple choice: one option line, default
    ``"{letter}. {choice}"``).  Data-loading attributes (``offline``, ``hf``, ``eval_split``,
    ``calib_split``, ``convert``, and for a task defined in a file (:mod:`.taskfile`) ``files``,
    ``{split: data file path}``, and ``source_path``, the task file) are used by
    :mod:`act_kernels.tasks.data`.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        instruction: str,
        convert: Callable[[Mapping[str, Any]], tuple[dict, int]],
        *,
        template: str | None = None,
        label_words: Sequence[str] = (),
        aliases: Sequence[str] = (),
        offline: Mapping[str, tuple[str, str]] | None = None,
        hf: tuple[str, str | None] | None = None,
        hf_splits: Sequence[str] = (),
        eval_split: str = "validation",
        calib_split: str = "train",
        description: str = "",
        option_format: str = "{letter}. {choice}",
        files: Mapping[str, str] | None = None,
        source_path: str | None = None,
    ):
        if kind not in (CLASSIFICATION, MULTIPLE_CHOICE):
            raise ValueError(f"unknown task kind {kind!r}")
        if kind == CLASSIFICATION and (template is None or len(label_words) < 2):
            raise ValueError("a classification task needs a template and >= 2 label words")
        self.name = name
        self.kind = kind
        self.instruction = instruction
        self.template = template
        self.label_words = tuple(label_words)
        self.aliases = tuple(aliases)
        self.convert = convert
        self.offline = dict(offline or {})
        self.hf = hf
        self.hf_splits = tuple(hf_splits)
        self.eval_split = eval_split
        self.calib_split = calib_split
        self.description = description
        self.option_format = option_format
        self.files = dict(files or {})
        self.source_path = source_path
        self._token_cache: dict[int, tuple[tuple[int, ...], ...]] = {}

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind!r})"

    # ------------------------------------------------------------------ examples
    def make_example(
        self, fields: Mapping[str, Any], gold: int, id: str, split: str = "", source: str = ""
    ) -> Example:
        """Build an :class:`Example` from normalised fields (see ``convert``) and a gold index."""
        fields = dict(fields)
        options = self.label_words if self.kind == CLASSIFICATION else tuple(fields["choices"])
        gold = int(gold)
        if not 0 <= gold < len(options):
            raise ValueError(f"{self.name}: gold index {gold} outside 0..{len(options) - 1} ({id})")
        if self.kind == MULTIPLE_CHOICE and len(options) > len(LETTERS):
            raise ValueError(f"{self.name}: at most {len(LETTERS)} options ({id})")
        ex = Example(id=id, task=self.name, prompt="", options=tuple(options), gold=gold,
                     fields=fields, split=split, source=source)
        return Example(id=id, task=self.name, prompt=self._format(ex), options=ex.options,
                       gold=gold, fields=fields, split=split, source=source)

    def example_from_row(self, row: Mapping[str, Any], id: str, split: str = "",
                         source: str = "") -> Example:
        """Convert one raw data row (Hugging Face schema, StaICC or local file) to an Example."""
        fields, gold = self.convert(row)
        return self.make_example(fields, gold, id=id, split=split, source=source)

    # ------------------------------------------------------------------ prompts
    def _block(self, ex: Example) -> str:
        """The example's own part of the prompt (no instruction, no answer)."""
        if self.kind == CLASSIFICATION:
            return self.template.format(**ex.fields)
        lines = [str(ex.fields["question"])]
        lines += [self.option_format.format(letter=LETTERS[i], choice=c)
                  for i, c in enumerate(ex.options)]
        return "\n".join(lines) + "\nAnswer:"

    def _format(self, ex: Example, shots: Sequence[Example] = ()) -> str:
        if self.kind == CLASSIFICATION:
            demos = "".join(self._block(s) + s.options[s.gold] + "\n\n" for s in shots)
            return self.instruction + demos + self._block(ex)
        demos = "".join(self._block(s) + " " + LETTERS[s.gold] + "\n\n" for s in shots)
        return self.instruction + "\n\n" + demos + self._block(ex)

    def build_prompt(self, example: Example, tokenizer=None, chat_template: bool = False,
                     shots: Sequence[Example] = ()) -> str:
        """The prompt text for ``example``.

        ``chat_template=False`` (the reference protocol) gives the raw prompt; encode it with the
        tokenizer's special tokens (``add_special_tokens=True``).  ``chat_template=True`` puts the
        raw prompt as the single user message through ``tokenizer.apply_chat_template(...,
        add_generation_prompt=True)``; encode that with ``add_special_tokens=False``.
        ``shots`` are optional in-context demonstrations (the reference's ``few_shot_number``;
        zero-shot by default), each followed by its gold label word / answer letter.
        """
        text = example.prompt if not shots else self._format(example, shots)
        if not chat_template:
            return text
        if tokenizer is None:
            raise ValueError("chat_template=True needs the tokenizer")
        return apply_chat(tokenizer, text)

    def loglik_requests(self, example: Example, tokenizer=None, chat_template: bool = False,
                        with_options: bool = False) -> list[tuple[str, str]]:
        """``(context, continuation)`` pairs, one per option, for the log-likelihood variant.

        Multiple choice: the context is the instruction and the question ending in ``"Answer:"``
        (cloze style, without the lettered list unless ``with_options``), the continuation is
        ``" " + option text``.  Classification: the context is the reference prompt and the
        continuation the label word.  A trailing space of the context is moved into the
        continuation (so ``"Sentiment: "`` + ``" negative"`` is ``"Sentiment:"`` + ``" negative"``).
        With ``chat_template`` the context is chat-wrapped and continuations lose leading spaces.
        """
        if self.kind == CLASSIFICATION or with_options:
            context = example.prompt
        else:
            context = self.instruction + "\n\n" + str(example.fields["question"]) + "\nAnswer:"
        conts = list(example.options) if self.kind == CLASSIFICATION else [
            " " + str(o) for o in example.options]
        if chat_template:
            if tokenizer is None:
                raise ValueError("chat_template=True needs the tokenizer")
            return [(apply_chat(tokenizer, context), c.lstrip()) for c in conts]
        out = []
        for c in conts:
            ctx = context
            if ctx.endswith(" ") and c.startswith(" "):
                ctx = ctx[:-1]
            elif ctx.endswith(" "):
                ctx, c = ctx[:-1], " " + c
            out.append((ctx, c))
        return out

    # ------------------------------------------------------------------ token ids
    def candidate_token_ids(self, tokenizer, n_options: int | None = None
                            ) -> tuple[tuple[int, ...], ...]:
        """Token ids scored for each option, for this tokenizer (cached per tokenizer object).

        Classification: ``((last token of label word 0,), (last token of label word 1,), ...)``,
        as the reference does (``tokenizer(label_words).input_ids[:, -1]``); a warning is given
        when a label word is several tokens or two label words share their last token.
        Multiple choice: for each letter, the distinct single-token encodings of ``" A"`` and
        ``"A"`` (the greedy token is correct when it decodes to the letter, leading space or not).
        """
        key = id(tokenizer)
        if key not in self._token_cache:
            self._token_cache[key] = self._compute_token_ids(tokenizer)
        ids = self._token_cache[key]
        return ids if n_options is None else ids[:n_options]

    def _compute_token_ids(self, tokenizer) -> tuple[tuple[int, ...], ...]:
        if self.kind == CLASSIFICATION:
            out = []
            for w in self.label_words:
                tok, n = _last_token(tokenizer, w)
                if n > 1:
                    warnings.warn(f"{self.name}: label word {w!r} is {n} tokens; scoring its last "
                                  "token as the reference does", stacklevel=3)
                out.append((tok,))
            flat = [t[0] for t in out]
            if len(set(flat)) != len(flat):
                warnings.warn(f"{self.name}: label words share a last token: {flat}", stacklevel=3)
            return tuple(out)
        return letter_token_ids(tokenizer)

    def option_token_ids(self, example: Example, tokenizer) -> tuple[tuple[int, ...], ...]:
        """Per-example option token ids (multiple choice: the letters of its options only)."""
        return self.candidate_token_ids(tokenizer, len(example.options))

    def score_item(self, example: Example, tokenizer) -> ScoreItem:
        """The :class:`ScoreItem` of ``example`` for :func:`score_last_logits`."""
        return ScoreItem(self.kind, self.option_token_ids(example, tokenizer), example.gold)

    def score_items(self, examples: Sequence[Example], tokenizer) -> list[ScoreItem]:
        return [self.score_item(e, tokenizer) for e in examples]


def letter_token_ids(tokenizer, letters: str = LETTERS) -> tuple[tuple[int, ...], ...]:
    """For each answer letter, the single tokens that decode (stripped) to exactly that letter,
    taken from the encodings of ``" A"`` and ``"A"``."""
    out = []
    for letter in letters:
        ids: list[int] = []
        for text in (" " + letter, letter):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) >= 1 and tokenizer.decode([enc[-1]]).strip() == letter and enc[-1] not in ids:
                ids.append(enc[-1])
        if not ids:
            raise ValueError(f"no single token decodes to the letter {letter!r}")
        out.append(tuple(ids))
    return tuple(out)


def apply_chat(tokenizer, text: str) -> str:
    """``text`` as the only user message, with the assistant generation prompt appended."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; use chat_template=False")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
