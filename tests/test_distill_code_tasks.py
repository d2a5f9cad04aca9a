"""The typed code tasks of the distillation corpus: valid Python whose doctests pass against
the reference solutions, seeded, and mixed into build_corpus only when a mix asks for them."""
from __future__ import annotations

import ast
import doctest
import itertools
import random
import re

import pytest

from dspark_export import distill_code_tasks as tasks
from dspark_export.distill_data import DEFAULT_MIX, DistillDataError, build_corpus


def _code(prompt: str) -> str:
    return prompt.split("```python\n", 1)[1].rsplit("```", 1)[0]


def test_task_prompts_are_python_whose_doctests_pass():
    stream = tasks.code_task_prompts(random.Random(1))
    seen = set()
    for _ in range(600):
        prompt = next(stream)
        code = _code(prompt)
        tree = ast.parse(code)  # valid Python with type hints
        fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
        assert fn.returns is not None and all(a.annotation is not None for a in fn.args.args)
        task = next(t for t in tasks._TASKS if fn.name in t.names)
        seen.add(task)
        namespace: dict = {}
        exec(code, namespace)  # the typing import must cover every hint it uses
        docstring = namespace[fn.name].__doc__
        # examples whose answer is None are left out (a doctest of None prints nothing)
        assert ">>> " in docstring or task.returns.startswith("Optional["), prompt
        namespace[fn.name] = lambda *args, _task=task: _task.solve(*args)
        test = doctest.DocTestParser().get_doctest(docstring, namespace, fn.name, None, 0)
        runner = doctest.DocTestRunner()
        runner.run(test, out=lambda _: None)
        assert runner.failures == 0, prompt
    assert len(seen) == len(tasks._TASKS)  # every task is drawn


def test_task_prompts_are_seeded_and_varied():
    first = list(itertools.islice(tasks.code_task_prompts(random.Random(5)), 50))
    again = list(itertools.islice(tasks.code_task_prompts(random.Random(5)), 50))
    assert first == again and len(set(first)) == 50
    names = {re.search(r"def (\w+)\(", p).group(1) for p in first}
    assert len(names) > 20


def test_mix_adds_code_tasks_without_changing_the_default_corpus():
    default = build_corpus(300, seed=2)
    assert build_corpus(300, seed=2, mix=dict(DEFAULT_MIX, code_tasks=0.0)) == default
    mixed = build_corpus(300, seed=2, mix={"code_tasks": 0.5, "math": 0.5})
    typed = [p for p in mixed if "from typing import" in p.text or ">>> " in p.text]
    assert 100 < len(typed) < 200 and all(p.domain == "code" for p in typed)
    assert {p.domain for p in mixed} == {"code", "math"}
    with pytest.raises(DistillDataError, match="code_tasks"):
        build_corpus(10, mix={"typo": 1.0})
