"""Reading DeepSpeed checkpoints from disk and exporting them as safetensors.

Nothing here needs a GPU, a process group or DeepSpeed itself: checkpoint files are parsed
lazily (`torch_archive`), tensors are assembled from their ZeRO partitions piece by piece
(`deepspeed_checkpoint`) and streamed into safetensors files (`safetensors_io`); `convert`
maps the names to diffusers' and ComfyUI's layouts and drives the export. `student` reads a
run's checkpoint or an export back into a model to sample from (docs/generate.md).
"""
