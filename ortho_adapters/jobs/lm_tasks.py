"""Tasks of the causal-LM job as chat prompts: Rotten Tomatoes and the tasks of :mod:`ortho_adapters.tasks`.

Prompt format (SmolLM2's chat template with a short system message, to keep CPU runs cheap)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>
    <|im_start|>user\\n{instruction}\\n\\n{input}\\n\\nOptions:\\n- {choice 1}\\n- {choice 2}...
    \\n\\nAnswer with one of the options only.<|im_end|>\\n<|im_start|>assistant\\n

and the answer is the assistant's reply ``{choice}<|im_end|>``. Tasks whose instruction names the
options (Rotten Tomatoes: ``negative`` / ``positive``; sarcasm, corr2cause, event_categories) do not
list them again; generative tasks (``arithmetic``) list none and ask for the number only.
An input too long for ``max_length`` keeps its first and last tokens around `` ... `` (the question at
the end of a ``logiqa`` passage survives), so the question, the options and the answer are never cut.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from .. import data
from ..tasks import check_task_name, load_task


class FrameTooLongError(ValueError):
    """The instruction, options and answer of an item alone exceed ``max_length``."""


@dataclass(frozen=True)
class LMTask:
    """How a task is asked: its instruction, and whether it is scored by generation."""

    name: str
    instruction: str
    generative: bool = False
    list_options: bool = True


@dataclass(frozen=True)
class LMExample:
    """A formatted example: the chat prompt up to the assistant's reply, the choices and the answer."""

    prompt: str
    choices: tuple[str, ...]
    answer: int

    @property
    def target(self) -> str:
        return self.choices[self.answer]


TASKS: dict[str, LMTask] = {
    t.name: t
    for t in (
        LMTask("rotten_tomatoes", "Is this movie review positive or negative?", list_options=False),
        LMTask("social_iqa", "Read the situation and pick the best answer to the question."),
        LMTask("arithmetic", "Compute the answer. Reply with the number only.", generative=True),
        LMTask("sarcasm", "Is this news headline sarcastic or not sarcastic?", list_options=False),
        LMTask("quartz", "Complete the statement about science with the right option."),
        LMTask("logiqa", "Read the passage and pick the option that answers the question."),
        LMTask(
            "corr2cause",
            "Given the premise, is the hypothesis an entailment, a contradiction or neutral?",
            list_options=False,
        ),
        LMTask(
            "event_categories",
            "Label this system log message as Information, Warning or Error.",
            list_options=False,
        ),
    )
}
OPTIONS_SUFFIX = "Answer with one of the options only."
SYSTEM_MESSAGE = "You are a helpful assistant."
RT_CHOICES = ("negative", "positive")  # label 0 = rotten, 1 = fresh


def get_task(name: str) -> LMTask:
    """The task ``name``; a retired BIG-bench name raises an error naming its replacement."""
    if name not in TASKS:
        check_task_name(name)
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def load_rows(name: str, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded ``(train, test)`` rows ``{"input", "choices", "answer"}``; the test rows ignore ``n_train``.

    Rotten Tomatoes uses :func:`ortho_adapters.data.load_rotten_tomatoes` (the encoder job's split);
    another task (:mod:`ortho_adapters.tasks`) is shuffled with ``seed``, ``test`` takes the first
    ``n_eval`` rows and ``train`` the next ``n_train`` (fewer if the task is smaller).
    """
    get_task(name)
    if name == "rotten_tomatoes":
        splits = data.load_rotten_tomatoes(n_train=n_train, n_eval=n_eval, seed=seed)
        return tuple(  # type: ignore[return-value]
            [
                {"input": f"Review: {t}", "choices": list(RT_CHOICES), "answer": y}
                for t, y in zip(s["text"], s["label"])
            ]
            for s in (splits["train"], splits["test"])
        )
    table = load_task(name)
    if n_eval >= len(table):
        raise ValueError(f"n_eval={n_eval} leaves no training examples of {name} ({len(table)} rows)")
    order = np.random.default_rng(seed).permutation(len(table))
    rows = table.select(order[: n_eval + n_train]).to_list()
    return rows[n_eval:], rows[:n_eval]


def _user_message(task: LMTask, text: str, choices: tuple[str, ...]) -> str:
    parts = [task.instruction, text]
    if task.list_options and not task.generative:
        parts += ["Options:\n" + "\n".join(f"- {c}" for c in choices), OPTIONS_SUFFIX]
    return "\n\n".join(parts)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    """The chat-template text of one user turn, ending where the assistant's reply starts."""
    messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _fit(tokenizer: PreTrainedTokenizerBase, text: str, budget: int) -> str:
    """``text`` cut to ``budget`` tokens, keeping its head and tail around `` ... ``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text
    head = max(budget - 2, 1) // 2
    tail = max(budget - 2 - head, 0)
    end = tokenizer.decode(ids[len(ids) - tail :]) if tail else ""
    return tokenizer.decode(ids[:head]) + " ... " + end


def format_example(tokenizer: PreTrainedTokenizerBase, task: LMTask, row: dict, max_length: int) -> LMExample:
    """The chat prompt of ``row``, its input shortened so that prompt + longest answer fit ``max_length``."""
    choices = tuple(row["choices"])
    frame = len(
        tokenizer(chat_prompt(tokenizer, _user_message(task, "", choices)), add_special_tokens=False)[
            "input_ids"
        ]
    )
    answer = (
        max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices) + 1
    )  # + end of turn
    budget = max_length - frame - answer
    if budget < 8:
        raise FrameTooLongError(
            f"max_length={max_length} is too short for {task.name} ({frame + answer} tokens of frame)"
        )
    while True:  # re-tokenizing the cut text can merge differently: shrink until it fits
        prompt = chat_prompt(
            tokenizer, _user_message(task, _fit(tokenizer, row["input"].strip(), budget), choices)
        )
        if (
            len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + answer <= max_length
            or budget <= 8
        ):
            return LMExample(prompt, choices, int(row["answer"]))
        budget -= 2


def load_examples(
    tokenizer: PreTrainedTokenizerBase, name: str, n_train: int, n_eval: int, max_length: int, seed: int = 0
) -> tuple[list[LMExample], list[LMExample]]:
    """Formatted ``(train, test)`` examples of task ``name`` (the same test examples for every arm)."""
    task = get_task(name)
    train, test = load_rows(name, n_train, n_eval, seed)
    return _format_all(tokenizer, task, train, max_length), _format_all(tokenizer, task, test, max_length)


def _format_all(tokenizer: PreTrainedTokenizerBase, task: LMTask, rows: list[dict], max_length: int) -> list:
    """Each row formatted; a row whose options alone do not fit ``max_length`` is dropped with a warning
    (e.g. one Social IQa item whose three options are whole paragraphs), unless every row is."""
    examples, dropped = [], []
    for row in rows:
        try:
            examples.append(format_example(tokenizer, task, row, max_length))
        except FrameTooLongError as err:
            dropped.append(err)
    if dropped and not examples:
        raise dropped[0]
    if dropped:
        warnings.warn(
            f"{task.name}: dropped {len(dropped)} of {len(rows)} items whose prompt frame and options do not "
            f"fit max_length={max_length} (first: {dropped[0]})",
            stacklevel=3,
        )
    return examples
