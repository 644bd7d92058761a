"""Document source of the testbed tasks (`custom_dataset: !function testbed_tasks.<skill>`).

The held-out examples come from the testbed's own generator (`llmreg.testbed.skills`,
split "eval"), the same ones `llmreg.testbed.evaluate_all` scores, so the suite and the
Python API measure the same thing. lm-eval calls the function with the task's
`metadata` (here `eval_n` and `table_seed`, which must match the build's: the default
build uses 200 and 0).
"""

from llmreg.testbed.skills import eval_dataset


def _source(skill):
    def make(eval_n=200, table_seed=0, **_):
        return eval_dataset(skill, eval_n=eval_n, table_seed=table_seed)

    make.__name__ = skill
    return make


copy = _source("copy")
reverse = _source("reverse")
sort = _source("sort")
add = _source("add")
recall = _source("recall")
sub = _source("sub")
