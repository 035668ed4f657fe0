"""Federated algorithms, one file per method, each a server/client protocol over Payloads and Replies.

``core/`` holds the contract, the registry, the one training loop and the mechanics several methods share
(prototypes, k-means); the other folders group methods by what they share between clients:

* ``reference/`` — nothing (Local);
* ``weight_sharing/`` — model weights, whole or in part (FedAvg, FedProx, FedAvg-FT, MOON, FedPer, LG-FedAvg,
  FedAli);
* ``prototype/`` — class prototypes in feature space (FedProto, FedTGP, ProtoNorm, FedGH);
* ``distillation/`` — predictions or a small go-between model (FedDistill, FML, FedKD).
"""
