"""The traced graph of a model: the nodes it can return, and the module that returns a chosen few.

torchvision's feature extraction (with timm's leaf modules and untraced functions for timm models),
shared by the frozen backbone (embedder.models.backbone), the catalog that finds a head's input
(embedder.models.catalog) and `embedder inspect` (embedder.models.inspection).
"""

from __future__ import annotations

from torch import nn


def graph_node_names(model: nn.Module, uses_timm: bool) -> list[str]:
    """The eval-mode graph nodes that can be returned, in execution order."""
    if uses_timm:
        from timm.models import get_graph_node_names
    else:
        from torchvision.models.feature_extraction import get_graph_node_names
    was_training = model.training
    model.eval()
    try:
        return list(get_graph_node_names(model)[1])
    finally:
        model.train(was_training)


def feature_extractor(model: nn.Module, nodes: tuple[str, ...], uses_timm: bool) -> nn.Module:
    """A graph module that returns {node: output} for each node. Only the needed part of the model runs."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    # timm's wrappers are these calls with its leaf modules and untraced functions.
    tracer = {}
    if uses_timm:
        from timm.layers import get_notrace_functions, get_notrace_modules

        tracer = {"tracer_kwargs": {"leaf_modules": list(get_notrace_modules()),
                                    "autowrap_functions": list(get_notrace_functions())}}
    model.eval()
    try:
        body = create_feature_extractor(model, return_nodes={n: n for n in nodes}, **tracer)
    except ValueError:
        # Nodes that only the eval-mode trace has (LeViT's and EfficientFormer's attention-bias
        # cache, read when not training): the train-mode graph gets the nodes it has, as it never runs (below).
        model.eval()  # the failed attempt left it in train mode
        train = get_graph_node_names(model, **tracer)[0]
        kept = [n for n in nodes if n in train] or train[-1:]
        body = create_feature_extractor(model, train_return_nodes={n: n for n in kept},
                                        eval_return_nodes={n: n for n in nodes}, **tracer)
        model.eval()
    # The graph module is traced twice and switches to its train-mode graph on `.train()`, where
    # functional dropout (DenseNet's F.dropout(training=self.training)) was traced as active;
    # setting `.training` back cannot switch it back. Both slots hold the eval graph, so no call can.
    if getattr(body, "eval_graph", None) is not None:
        body.train_graph = body.eval_graph
    return body
