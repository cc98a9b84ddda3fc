{{- define "fleet-hub.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleet-hub.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleet-hub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleet-hub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fleet-hub.labels" -}}
{{ include "fleet-hub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleet-hub
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fleet-hub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fleet-hub.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fleet-hub.tokenSecret" -}}
{{- default (printf "%s-tokens" (include "fleet-hub.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "fleet-hub.externalDatabase" -}}
{{- if or .Values.database.url .Values.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Hub replicas: replicaCount, else 2 with an external database and 1 with the private one. */}}
{{- define "fleet-hub.replicas" -}}
{{- if not (kindIs "invalid" .Values.replicaCount) -}}
{{- int .Values.replicaCount -}}
{{- else if include "fleet-hub.externalDatabase" . -}}
2
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* The Secret holding the hub's serving certificate; empty with tls.enabled false. */}}
{{- define "fleet-hub.tlsSecret" -}}
{{- if .Values.tls.existingSecret -}}
{{ .Values.tls.existingSecret }}
{{- else if .Values.tls.enabled -}}
{{ include "fleet-hub.fullname" . }}-tls
{{- end -}}
{{- end -}}

{{/* Whether the chart makes the certificate itself (no Secret, no issuer given). */}}
{{- define "fleet-hub.tlsGenerated" -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not .Values.tls.certManager.issuerRef.name) -}}true{{- end -}}
{{- end -}}

{{- define "fleet-hub.scheme" -}}
{{ if include "fleet-hub.tlsSecret" . }}HTTPS{{ else }}HTTP{{ end }}
{{- end -}}
