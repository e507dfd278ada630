"""The shard contract both the shard builder (``sharding/``) and the training readers import.

``schema`` names the sample members and classes, ``manifest`` the per-shard table, ``tario`` reads tar members
safely and ``safeimage`` decodes images with a pixel cap. Nothing here imports a training component.
"""
