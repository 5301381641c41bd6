{{/*
Chart name, truncated to the 63 characters Kubernetes allows in a DNS label.
*/}}
{{- define "helios-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release name + chart name (once, when the release already contains it).
*/}}
{{- define "helios-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "helios-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "helios-serve.labels" -}}
helm.sh/chart: {{ include "helios-serve.chart" . }}
{{ include "helios-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: helios-serve
{{- end }}

{{/*
Selector labels (immutable on a Deployment: keep them minimal).
*/}}
{{- define "helios-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "helios-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "helios-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "helios-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository[:tag][@digest]; the tag defaults to "<appVersion>-<flavor>".
*/}}
{{- define "helios-serve.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "helios-serve.testImage" -}}
{{- if .Values.tests.image.repository }}
{{- printf "%s:%s" .Values.tests.image.repository (required "tests.image.tag is required with tests.image.repository" .Values.tests.image.tag) }}
{{- else }}
{{- include "helios-serve.image" . }}
{{- end }}
{{- end }}

{{/*
The app's config as TOML. Helm hands numbers to templates as float64 and toToml writes them as "8000.0";
whole numbers are turned back into TOML integers (float settings accept integers).
*/}}
{{- define "helios-serve.configToml" -}}
{{- /* responses.store follows redis.* (the schema keeps it out of config), so it always matches the URL. */}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $responses := deepCopy (get $config "responses" | default dict) }}
{{- $_ := set $responses "store" (ternary "redis" "memory" (include "helios-serve.redisUsed" . | eq "true")) }}
{{- $_ := set $config "responses" $responses }}
{{- $toml := toToml $config }}
{{- if hasPrefix "toml:" $toml }}
{{- fail (printf "config cannot be written as TOML: %s (note: arrays must not mix types)" $toml) }}
{{- end }}
{{- regexReplaceAll "(?m)^(\\s*[A-Za-z0-9_-]+ = -?[0-9]+)\\.0$" $toml "${1}" }}
{{- end }}

{{/*
Port the container listens on (config.server.port, default 8000).
*/}}
{{- define "helios-serve.containerPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- $port := 8000 }}
{{- if hasKey $server "port" }}{{ $port = $server.port }}{{ end }}
{{- $port | int }}
{{- end }}

{{- define "helios-serve.gracefulTimeout" -}}
{{- $server := .Values.config.server | default dict }}
{{- $timeout := 30 }}
{{- if hasKey $server "graceful_timeout" }}{{ $timeout = $server.graceful_timeout }}{{ end }}
{{- $timeout | float64 | ceil | int }}
{{- end }}

{{- define "helios-serve.terminationGracePeriodSeconds" -}}
{{- $graceful := include "helios-serve.gracefulTimeout" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $graceful 15 }}
{{- else }}
{{- $tgps := .Values.terminationGracePeriodSeconds | int }}
{{- if le $tgps $graceful }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than config.server.graceful_timeout (%d)" $tgps $graceful) }}
{{- end }}
{{- $tgps }}
{{- end }}
{{- end }}

{{/*
Whether client auth is on, and where the keys come from.
*/}}
{{- define "helios-serve.authEnabled" -}}
{{- if or .Values.auth.apiKeys .Values.auth.existingSecret }}true{{ end }}
{{- end }}

{{- define "helios-serve.authSecretName" -}}
{{- default (include "helios-serve.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "helios-serve.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}helios_auth__api_keys{{ end }}
{{- end }}

{{/*
Whether the chart renders its own Secret (inline client keys, inline provider keys, the Redis URL unless it
comes from redis.existingSecret).
*/}}
{{- define "helios-serve.createSecret" -}}
{{- if or (and .Values.auth.apiKeys (not .Values.auth.existingSecret)) (and .Values.providerKeys (not .Values.providerKeysExistingSecret)) .Values.redis.enabled .Values.redis.url }}true{{ end }}
{{- end }}

{{/*
Checksum of what the chart's Secret is made of rather than of the rendered Secret: a generated Redis password is
new at every render and only kept across upgrades through `lookup`, so hashing it would roll the pods (and
wipe the built-in Redis) on the first upgrade for nothing.
*/}}
{{- define "helios-serve.secretChecksum" -}}
{{- $inputs := dict "fullname" (include "helios-serve.fullname" .) "redis" (pick .Values.redis "enabled" "url" "auth") }}
{{- if not .Values.auth.existingSecret }}{{ $_ := set $inputs "apiKeys" .Values.auth.apiKeys }}{{ end }}
{{- if not .Values.providerKeysExistingSecret }}{{ $_ := set $inputs "providerKeys" .Values.providerKeys }}{{ end }}
{{- toJson $inputs | sha256sum }}
{{- end }}

{{/*
Stored responses in Redis: the built-in one (redis.enabled) or an external one (redis.url / existingSecret).
*/}}
{{- define "helios-serve.redisUsed" -}}
{{- if or .Values.redis.enabled .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/*
Whether more than one helios pod can run (the rule of values.schema.json's check for a shared Redis).
*/}}
{{- define "helios-serve.severalReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/*
Where the app's responses.redis_url comes from: a key of the chart's Secret, or of redis.existingSecret. The file
name (helios_responses__redis_url in HELIOS_SECRETS_DIR) is what the app's settings read as responses.redis_url.
*/}}
{{- define "helios-serve.redisUrlSecretName" -}}
{{- default (include "helios-serve.fullname" .) .Values.redis.existingSecret }}
{{- end }}

{{- define "helios-serve.redisUrlSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}helios_responses__redis_url{{ end }}
{{- end }}

{{/*
The built-in Redis: its name (a suffix on a fullname cut short enough to stay distinct from it), and labels whose
name differs from the app's, so that the app's Service, PDB and ServiceMonitor selectors never match it.
*/}}
{{- define "helios-serve.redisFullname" -}}
{{- printf "%s-redis" (include "helios-serve.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "helios-serve.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-redis" (include "helios-serve.name" . | trunc 57 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "helios-serve.redisLabels" -}}
helm.sh/chart: {{ include "helios-serve.chart" . }}
{{ include "helios-serve.redisSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: helios-serve
{{- end }}

{{/*
Password of the built-in Redis: redis.auth.password, else the one an earlier install generated (kept in the
chart's Secret), else a new one. Include it once per manifest: a new one is random at each include.
*/}}
{{- define "helios-serve.redisPassword" -}}
{{- if .Values.redis.auth.password }}
{{- .Values.redis.auth.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "helios-serve.fullname" .) | default dict }}
{{- $previous := dig "data" "redis-password" "" $existing }}
{{- if $previous }}{{ b64dec $previous }}{{ else }}{{ randAlphaNum 32 }}{{ end }}
{{- end }}
{{- end }}

{{/*
URL of the built-in Redis, given (dict "context" $ "password" $password). The password is percent-encoded for
the URL's userinfo (urlquery writes a space as "+", which a URL parser keeps as "+": hence the replace; a "+"
itself is already "%2B").
*/}}
{{- define "helios-serve.builtinRedisUrl" -}}
{{- $ctx := .context }}
{{- $auth := "" }}
{{- if $ctx.Values.redis.auth.enabled }}
{{- $auth = printf ":%s@" (.password | urlquery | replace "+" "%20") }}
{{- end }}
{{- printf "redis://%s%s:6379/0" $auth (include "helios-serve.redisFullname" $ctx) }}
{{- end }}

{{/*
Whether some model uses the embedded engine.
*/}}
{{- define "helios-serve.hasEmbeddedModel" -}}
{{- range (.Values.config.models | default list) }}
{{- if and (kindIs "map" .) (eq (toString (index . "backend")) "vllm") }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express; they fail `helm install/template` with a clear message.
*/}}
{{- define "helios-serve.validate" -}}
{{- if and .Values.auth.apiKeys .Values.auth.existingSecret }}
{{- fail "set auth.apiKeys or auth.existingSecret, not both" }}
{{- end }}
{{- if and .Values.providerKeys .Values.providerKeysExistingSecret }}
{{- fail "set providerKeys or providerKeysExistingSecret, not both" }}
{{- end }}
{{- $auth := .Values.config.auth | default dict }}
{{- if (index $auth "api_keys") }}
{{- fail "config.auth.api_keys must stay empty (the ConfigMap is not secret): use auth.apiKeys or auth.existingSecret" }}
{{- end }}
{{- if and .Values.gpu.enabled (ne .Values.image.flavor "gpu") (not .Values.image.tag) }}
{{- fail (printf "gpu.enabled needs image.flavor=gpu (got %q), or an explicit image.tag" .Values.image.flavor) }}
{{- end }}
{{- if include "helios-serve.hasEmbeddedModel" . }}
{{- if and (eq .Values.image.flavor "gateway") (not .Values.image.tag) }}
{{- fail "a model with backend \"vllm\" needs the embedded engine: set image.flavor to cpu or gpu (the gateway image serves remote providers only)" }}
{{- end }}
{{- $server := .Values.config.server | default dict }}
{{- if gt (index $server "workers" | default 1 | int) 1 }}
{{- fail "a model with backend \"vllm\" needs config.server.workers = 1" }}
{{- end }}
{{- end }}
{{- $redisSources := list }}
{{- if .Values.redis.enabled }}{{ $redisSources = append $redisSources "redis.enabled" }}{{ end }}
{{- if .Values.redis.url }}{{ $redisSources = append $redisSources "redis.url" }}{{ end }}
{{- if .Values.redis.existingSecret }}{{ $redisSources = append $redisSources "redis.existingSecret" }}{{ end }}
{{- if gt (len $redisSources) 1 }}
{{- fail (printf "set only one of redis.enabled, redis.url and redis.existingSecret (got %s)" (join ", " $redisSources)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- end }}

{{/*
PromQL matchers selecting this release's series.
*/}}
{{- define "helios-serve.promSelector" -}}
{{- if .Values.metrics.prometheusRule.selector }}
{{- .Values.metrics.prometheusRule.selector }}
{{- else }}
{{- printf "job=%q,namespace=%q" (include "helios-serve.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}
