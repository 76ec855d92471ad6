{{/* Chart name, overridable. */}}
{{- define "gpucap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name: the release name, plus the chart name unless the release name already holds it. */}}
{{- define "gpucap.fullname" -}}
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

{{- define "gpucap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpucap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpucap.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gpucap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gpucap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpucap.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpucap.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the pod sees the node's pod-resources directory; the config's kubelet.socket points into it. */}}
{{- define "gpucap.podResourcesMount" -}}/var/lib/kubelet/pod-resources{{- end }}

{{/*
gpucap's config file: the user's `config` values plus the keys the chart owns (they must agree with the
pod spec: the listen port, the mounted socket, hostPID for the processes collector).
*/}}
{{- define "gpucap.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $_ := set $cfg "listen" (printf ":%d" (int .Values.service.port)) }}
{{- $kubelet := deepCopy (get $cfg "kubelet" | default dict) }}
{{- $_ := set $kubelet "socket" (printf "%s/kubelet.sock" (include "gpucap.podResourcesMount" .)) }}
{{- $_ := set $cfg "kubelet" $kubelet }}
{{- $history := deepCopy (get $cfg "history" | default dict) }}
{{- if .Values.history.enabled }}
{{- $_ := set $history "path" "/var/lib/gpucap/history.db" }}
{{- $_ := set $history "retention" .Values.history.retention }}
{{- $_ := set $history "max_size" .Values.history.maxSize }}
{{- else }}
{{- $_ := set $history "enabled" false }}
{{- end }}
{{- $_ := set $cfg "history" $history }}
{{- if .Values.budgets }}
{{- $cost := deepCopy (get $cfg "cost" | default dict) }}
{{- $_ := set $cost "budgets" (mergeOverwrite (deepCopy (get $cost "budgets" | default dict)) .Values.budgets) }}
{{- $_ := set $cfg "cost" $cost }}
{{- end }}
{{- if not .Values.hostPID }}
{{- $processes := deepCopy (get $cfg "processes" | default dict) }}
{{- $_ := set $processes "enabled" false }}
{{- $_ := set $cfg "processes" $processes }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
