"""Document filters of the local lm-evaluation-harness tasks in this folder."""


def non_empty_lines(dataset):
    """Drop blank lines: a document with no tokens has nothing to score."""
    return dataset.filter(lambda doc: doc["text"].strip() != "")
