"""Document hooks for the local lm-eval tasks (referenced as `!function llmreg_tasks.<name>`)."""


def drop_blank_lines(dataset):
    """The `text` loader gives one row per line; TinyStories paragraphs are single lines separated by blank
    ones (story boundaries are not recoverable), so one non-blank line = one document."""
    return dataset.filter(lambda doc: doc["text"].strip() != "")
