"""Training of the task types (embedding, rerankers, classifiers): losses, collator, trainer."""
