{{/*
Names, labels, the serve config and the pieces every Ray pod shares. Templates render one object each and take
their Ray pods from "raymoe.rayPod", so serving and finetuning pods mount, check and secure the model alike.
*/}}

{{- define "raymoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-raymoe, or the release name when it already contains the chart name; 40 characters at most, so
KubeRay's derived names (<name>-<5 chars>-head-svc, <name>-serve-svc) stay within Kubernetes' limits. */}}
{{- define "raymoe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "raymoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "raymoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raymoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "raymoe.labels" -}}
helm.sh/chart: {{ include "raymoe.chart" . }}
{{ include "raymoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "raymoe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "raymoe.claimName" -}}
{{- default (printf "%s-models" (include "raymoe.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{/* A path of the app under serve.routePrefix: (include "raymoe.appPath" (list . "v1")) -> /v1 or /llm/v1. */}}
{{- define "raymoe.appPath" -}}
{{- printf "%s/%s" (trimSuffix "/" (index . 0).Values.serve.routePrefix) (index . 1) }}
{{- end }}

{{- define "raymoe.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "raymoe.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "raymoe.finetuneName" -}}
{{- printf "%s-ft-%s" (include "raymoe.fullname" .) .Values.finetune.name }}
{{- end }}

{{/* Cross-field checks JSON Schema cannot express; each message names the keys at fault. */}}
{{- define "raymoe.validate" -}}
{{- $name := include "raymoe.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "values: the object name %q must start with a letter (KubeRay takes only DNS-1035 names): rename the release or set fullnameOverride" $name) }}
{{- end }}
{{- if and .Values.finetune.enabled (gt (len (include "raymoe.finetuneName" .)) 47) }}
{{- fail (printf "values: the finetune RayJob name %q is longer than KubeRay's 47 characters: shorten finetune.name or the release name" (include "raymoe.finetuneName" .)) }}
{{- end }}
{{- $a := .Values.serve.autoscaling }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "values: serve.autoscaling.minReplicas (%d) is greater than serve.autoscaling.maxReplicas (%d)" (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
{{- range $key := list "gpuWorkers" "cpuWorkers" }}
{{- $g := index $.Values $key }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "values: %s.minReplicas (%d) is greater than %s.maxReplicas (%d)" $key (int $g.minReplicas) $key (int $g.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "values: %s.replicas (%d) is outside [minReplicas, maxReplicas] = [%d, %d]" $key (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- $ep := .Values.serve.expertParallel }}
{{- $engine := .Values.serve.engine }}
{{- if eq (default "raymoe" $engine.kind) "vllm" }}
{{- if gt (int $ep.numShards) 0 }}
{{- fail (printf "values: serve.engine.kind vllm runs plain model replicas: set serve.expertParallel.numShards (%d) to 0 (expert shards are raymoe's engine)" (int $ep.numShards)) }}
{{- end }}
{{- if .Values.serve.lora.modules }}
{{- fail "values: serve.lora.modules needs serve.engine.kind raymoe: the vllm engine serves no LoRA adapters" }}
{{- end }}
{{- else if $engine.vllm }}
{{- fail "values: serve.engine.vllm is for serve.engine.kind vllm only" }}
{{- end }}
{{- $perReplica := addf .Values.serve.numGpus (mulf (int $ep.numShards) $ep.gpusPerShard) }}
{{- $gw := .Values.gpuWorkers }}
{{- if and (gt $perReplica 0.0) (not $gw.enabled) }}
{{- fail (printf "values: a model replica needs %v GPUs (serve.numGpus + serve.expertParallel.numShards x gpusPerShard) but gpuWorkers.enabled is false" $perReplica) }}
{{- end }}
{{- if and $gw.enabled (gt (mulf $a.maxReplicas $perReplica) (mulf $gw.maxReplicas $gw.gpus)) }}
{{- fail (printf "values: serve.autoscaling.maxReplicas (%d) model replicas of %v GPUs each do not fit gpuWorkers.maxReplicas (%d) pods of gpuWorkers.gpus (%d)" (int $a.maxReplicas) $perReplica (int $gw.maxReplicas) (int $gw.gpus)) }}
{{- end }}
{{- if not (or .Values.gpuWorkers.enabled .Values.cpuWorkers.enabled) }}
{{- fail "values: enable gpuWorkers or cpuWorkers: the head runs no model replicas" }}
{{- end }}
{{- if and .Values.apiKey.enabled (not .Values.apiKey.existingSecret) (not .Values.apiKey.value) }}
{{- fail "values: apiKey.enabled needs apiKey.existingSecret (recommended) or apiKey.value" }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.storage.mountPath)) .Values.model.path) }}
{{- fail (printf "values: model.path (%s) must lie under storage.mountPath (%s), where the model volume is mounted" .Values.model.path .Values.storage.mountPath) }}
{{- end }}
{{- end }}

{{/* The args of raymoe.deployments.app:build_app (ServeAppConfig in deployments/config.py), as YAML. */}}
{{- define "raymoe.serveArgs" -}}
{{- $s := .Values.serve }}
{{- $a := $s.autoscaling }}
{{- $args := dict "model" .Values.model.path "num_cpus" $s.numCpus "num_gpus" $s.numGpus "max_ongoing_requests" $s.maxOngoingRequests "max_queued_requests" $s.maxQueuedRequests "retry_after_s" $s.retryAfterS "default_max_tokens" $s.defaultMaxTokens "max_request_bytes" $s.maxRequestBytes "ingress_replicas" $s.ingress.replicas "ingress_num_cpus" $s.ingress.numCpus "engine_core" $s.engineCore }}
{{- with .Values.model.servedName }}{{ $_ := set $args "served_model_name" . }}{{ end }}
{{- if .Values.apiKey.enabled }}{{ $_ := set $args "api_key_env" "RAYMOE_API_KEY" }}{{ end }}
{{- $_ := set $args "autoscaling" (dict "min_replicas" $a.minReplicas "max_replicas" $a.maxReplicas "target_ongoing_requests" $a.targetOngoingRequests "upscale_delay_s" $a.upscaleDelayS "downscale_delay_s" $a.downscaleDelayS) }}
{{- $vllm := eq (default "raymoe" $s.engine.kind) "vllm" }}
{{- $engine := omit $s.engine "kind" "vllm" | deepCopy }}
{{- if $vllm }}
{{- $_ := set $engine "kind" "vllm" }}
{{- with $s.engine.vllm }}{{ $_ := set $engine "vllm" . }}{{ end }}
{{- end }}
{{- $ep := $s.expertParallel }}
{{- if and (not $vllm) (gt (int $ep.numShards) 0) }}
{{- $_ := set $engine "parallel" (dict "num_shards" $ep.numShards "transport" $ep.transport "cpus_per_shard" $ep.cpusPerShard "gpus_per_shard" $ep.gpusPerShard "placement_strategy" $ep.placementStrategy) }}
{{- end }}
{{- $_ := set $args "engine" $engine }}
{{- $lora := $s.lora }}
{{- if and $lora.enabled (not $vllm) }}
{{- $_ := set $args "lora_root" .Values.adapters.root }}
{{- $_ := set $args "max_loras" $lora.maxLoras }}
{{- $_ := set $args "max_cpu_loras" $lora.maxCpuLoras }}
{{- $_ := set $args "max_lora_rank" $lora.maxLoraRank }}
{{- with $lora.modules }}{{ $_ := set $args "lora_modules" . }}{{ end }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/* serveConfigV2: the `serve deploy` config file of deployments/configs/*.yaml, built from values. */}}
{{- define "raymoe.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.port }}
applications:
  - name: {{ .Values.serve.appName }}
    route_prefix: {{ .Values.serve.routePrefix }}
    import_path: raymoe.deployments.app:build_app
    args:
      {{- include "raymoe.serveArgs" . | nindent 6 }}
{{- end }}

{{/* The init container of every Ray pod: the weights are there, or fetched from model.source, or the pod stops
with a message naming the path and the values to set. */}}
{{- define "raymoe.modelInit" -}}
- name: model-check
  image: {{ include "raymoe.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/bash", "-c"]
  args:
    - |
      set -euo pipefail
      m="$MODEL_PATH"
      have() { [ -f "$m/config.json" ] && compgen -G "$m/*.safetensors" > /dev/null; }
      if have; then echo "raymoe: model weights found at $m"; exit 0; fi
      if [ -n "$MODEL_SOURCE" ]; then
        tmp="$m.partial-$HOSTNAME"; rm -rf "$tmp"; mkdir -p "$(dirname "$m")"
        echo "raymoe: no weights at $m yet: fetching $MODEL_SOURCE"
        if [ "$MODEL_SOURCE" = tiny ]; then raymoe tiny-checkpoint "$tmp" --dtype float32 > /dev/null
        else mkdir -p "$tmp"; python -c 'import sys, pyarrow.fs as fs; fs.copy_files(sys.argv[1], sys.argv[2])' "$MODEL_SOURCE" "$tmp"; fi
        mv -T "$tmp" "$m" 2> /dev/null || rm -rf "$tmp"   # another pod got there first: keep its copy
      fi
      if ! have; then
        echo "raymoe: no model weights at $m (model.path): it needs config.json and *.safetensors." >&2
        echo "Copy a Hugging Face checkpoint there on the model volume ({{ eq .Values.storage.type "pvc" | ternary (printf "PVC %s" (include "raymoe.claimName" .)) "a per-pod emptyDir" }}, mounted at {{ .Values.storage.mountPath }}), or set model.source to an s3:// or gs:// URI." >&2
        exit 1
      fi
  env:
    - {name: MODEL_PATH, value: {{ .Values.model.path | quote }}}
    - {name: MODEL_SOURCE, value: {{ .Values.model.source | quote }}}
  {{- with .Values.model.sourceSecret }}
  envFrom:
    - secretRef: {name: {{ . }}}
  {{- end }}
  resources:
    {{- toYaml .Values.model.initResources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: models, mountPath: {{ .Values.storage.mountPath }}}
{{- end }}

{{/*
One Ray pod template (metadata + spec) for a head or a worker group, of the serving cluster or a finetune job.
Params: root (the chart context), role (head | worker), component (serve | finetune), group (values with
resources, nodeSelector, tolerations, affinity, env; workers: gpus, shmSize), jobConfig (bool: mount the job file).
*/}}
{{- define "raymoe.rayPod" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .group }}
{{- $serve := eq .component "serve" }}
{{- $gpus := int (default 0 $g.gpus) -}}
metadata:
  labels:
    {{- include "raymoe.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  initContainers:
    {{- include "raymoe.modelInit" $root | nindent 4 }}
  containers:
    - name: {{ eq .role "head" | ternary "ray-head" "ray-worker" }}
      image: {{ include "raymoe.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if eq .role "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        {{- if $serve }}
        - {name: serve, containerPort: {{ $v.serve.port }}}
        {{- end }}
        - {name: metrics, containerPort: 8080}
      {{- $tput := and $serve $v.serve.throughputOptimized }}
      {{- $hap := and $serve $v.serve.haproxy }}
      {{- if or (and $serve $v.apiKey.enabled) $tput $hap $g.env }}
      env:
        {{- if and $serve $v.apiKey.enabled }}
        - name: RAYMOE_API_KEY
          valueFrom:
            secretKeyRef: {name: {{ include "raymoe.apiKeySecretName" $root }}, key: {{ $v.apiKey.secretKey }}}
        {{- end }}
        {{- if $tput }}
        - {name: RAY_SERVE_THROUGHPUT_OPTIMIZED, value: "1"}
        {{- end }}
        {{- if $hap }}
        - {name: RAY_SERVE_ENABLE_HA_PROXY, value: "1"}
        {{- end }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      resources:
        {{- $res := deepCopy (default dict $g.resources) }}
        {{- if gt $gpus 0 }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $gpus) (default dict $res.limits)) }}
        {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $gpus) (default dict $res.requests)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      {{- if $serve }}
      {{- $p := $v.probes }}
      livenessProbe:
        httpGet: {path: /api/healthz, port: 52365}
        {{- toYaml $p.liveness | nindent 8 }}
      readinessProbe:
        {{- if eq .role "head" }}
        httpGet: {path: /api/healthz, port: 52365}
        {{- else }}
        httpGet: {path: {{ include "raymoe.appPath" (list $root "health") }}, port: serve}
        {{- end }}
        {{- toYaml $p.readiness | nindent 8 }}
      {{- end }}
      volumeMounts:
        - {name: models, mountPath: {{ $v.storage.mountPath }}}
        - {name: dshm, mountPath: /dev/shm}
        {{- if .jobConfig }}
        - {name: job-config, mountPath: /etc/raymoe/finetune, readOnly: true}
        {{- end }}
  volumes:
    {{- if eq $v.storage.type "pvc" }}
    - name: models
      persistentVolumeClaim: {claimName: {{ include "raymoe.claimName" $root }}}
    {{- else }}
    - name: models
      emptyDir: {sizeLimit: {{ $v.storage.emptyDir.sizeLimit }}}
    {{- end }}
    - name: dshm
      emptyDir: {medium: Memory{{ with $g.shmSize }}, sizeLimit: {{ . }}{{ end }}}
    {{- if .jobConfig }}
    - name: job-config
      configMap: {name: {{ include "raymoe.finetuneName" $root }}}
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
