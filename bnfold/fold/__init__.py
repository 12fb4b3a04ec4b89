"""The fold core: graph view, rules, weight math, engine and the decisions as data.

One job per module:

- ``engine``: walks every graph, tries the rules on each affine node, owns privacy, rounding and the commit;
- ``rules``: the fold rules as data, and their one registry (``REGISTRY``);
- ``affine``: reads a BN or a Mul/Add/Sub/Div by a constant as ``y = s * x + t`` along one axis;
- ``channels``: follows a channel axis through layout ops (Transpose, Reshape, Squeeze, ...);
- ``slots``: the weight inputs a fold rewrites, each rounded once per chain;
- ``math``: the pure numpy math of every fold;
- ``graph``: a read-and-edit view of one ONNX graph (producers, readers, constants, shapes);
- ``consteval``: evaluation of constant subgraphs;
- ``nodes``: node attributes and names;
- ``report``: what was folded, what was left and why (reason codes).

It imports nothing from ``bnfold.onnxio``, ``bnfold.verify`` or ``bnfold.cli``.
"""
