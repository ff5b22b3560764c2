"""Arguments of the non-generative task types: embedding models, rerankers and sequence classifiers.

``TaskArguments`` is shared by training and the commands that load a checkpoint (infer, deploy,
eval): a checkpoint's ``args.json`` records what it was trained as, so ``deploy --ckpt_dir D``
needs none of these flags; given, they override it. ``TaskTrainArguments`` adds what only
training uses (labels, losses, negatives). Names follow ms-swift where it has them
(``--task_type``, ``--num_labels``, ``--loss_type infonce``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import field

TASK_TYPES = ("causal_lm", "seq_cls", "embedding", "reranker", "generative_reranker")
PROBLEM_TYPES = ("single_label", "multi_label", "regression")
POOLINGS = ("last", "mean", "cls")


@dataclass
class TaskArguments:
    """What the model is for: a chat model, or an embedding model, reranker or classifier."""

    task_type: Optional[Literal["causal_lm", "seq_cls", "embedding", "reranker", "generative_reranker"]] = field(
        None, "causal_lm (chat), seq_cls (classifier head), embedding (pooled, normalised vectors), reranker "
              "(one relevance score per query/document pair), generative_reranker (the 'yes' vs 'no' logit of a "
              "causal LM); default: what the checkpoint was trained as (args.json), else causal_lm")
    pooling: Optional[Literal["last", "mean", "cls"]] = field(
        None, "embedding: how token states become one vector; default: last for decoder models (Qwen3-Embedding "
              "style), mean for encoders (BERT family), or what the checkpoint was trained with")
    query_prompt: Optional[str] = field(
        None, "embedding: text put before every query (e.g. 'Instruct: Given a question, retrieve its answer\\n"
              "Query:'); documents get --document_prompt. Default: the checkpoint's, else none")
    document_prompt: Optional[str] = field(None, "embedding: text put before every document (default: none)")
    rerank_instruction: Optional[str] = field(
        None, "rerankers on decoder models: the <Instruct> line of the query/document prompt (default: 'Given a "
              "query, judge whether the document answers it')")


@dataclass
class TaskTrainArguments(TaskArguments):
    """Training an embedding model, reranker or classifier (sft --task_type ...)."""

    num_labels: Optional[int] = field(None, "seq_cls: number of classes (default: from the data's labels)")
    problem_type: Optional[Literal["single_label", "multi_label", "regression"]] = field(
        None, "seq_cls: one class per row, any set of classes (a list label), or real values; default: from the "
              "labels (a list: multi_label, a float: regression, an int or a name: single_label)")
    label_names: list[str] = field(default_factory=list,
                                   help="seq_cls: class names in label-id order (default: the names in the data, "
                                        "sorted, when labels are names)")
    num_negatives: Optional[int] = field(
        None, "embedding/rerankers: hard negatives per row used in training (the first N of rejected_response); "
              "default: all of them")
    infonce_temperature: float = field(0.05, "embedding, loss_type infonce: softmax temperature over cosine "
                                             "similarities")
    infonce_use_batch: bool = field(True, "embedding, loss_type infonce: the other rows' documents in a batch "
                                          "(and on the other processes) are negatives too")
    matryoshka_dims: list[int] = field(default_factory=list,
                                       help="embedding: also train the first D dimensions of each vector as an "
                                            "embedding of its own (Matryoshka), e.g. 64 32; the loss is averaged")
    contrastive_margin: float = field(0.5, "embedding, loss_type contrastive: cosine distance beyond which a "
                                           "negative pair costs nothing")
    listwise_temperature: float = field(1.0, "listwise rerankers: softmax temperature over a query's candidates")
