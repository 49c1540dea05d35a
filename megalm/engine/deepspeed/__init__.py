"""DeepSpeed behind megalm's Engine interface, split by job: ``config`` (the JSON dict), ``compat`` (the import,
the model-parallel unit, a pinned patch), ``zero3`` (building the model partitioned), ``engine``. Importing this
package does not import deepspeed."""
