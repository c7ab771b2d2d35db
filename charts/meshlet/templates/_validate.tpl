{{/*
Refuses contradictory values that the schema cannot express, before anything
reaches the cluster. Each message names the values and says what to change.
Included once, from injector.yaml.
*/}}
{{- define "meshlet.validate" -}}
{{- $v := .Values -}}

{{- if lt (int $v.injector.replicas) 1 -}}
{{- fail (printf "injector.replicas is %v; it must be at least 1 (2 or more for HA), since every pod creation in a meshed namespace goes through the injector" $v.injector.replicas) -}}
{{- end -}}

{{- if and $v.injector.podDisruptionBudget.enabled (ge (int $v.injector.podDisruptionBudget.minAvailable) (int $v.injector.replicas)) -}}
{{- fail (printf "injector.podDisruptionBudget.minAvailable (%v) must be lower than injector.replicas (%v), or node drains block forever; raise injector.replicas or set injector.podDisruptionBudget.enabled=false" $v.injector.podDisruptionBudget.minAvailable $v.injector.replicas) -}}
{{- end -}}

{{- $tls := $v.webhook.tls -}}
{{- $userCert := or $tls.caCert $tls.cert $tls.key -}}
{{- if and $v.webhook.certManager.enabled $userCert -}}
{{- fail "webhook.certManager.enabled=true and webhook.tls.* are both set; choose one source for the webhook certificate: unset webhook.tls.caCert/cert/key, or set webhook.certManager.enabled=false" -}}
{{- end -}}
{{- if and $userCert (not (and $tls.caCert $tls.cert $tls.key)) -}}
{{- fail "webhook.tls needs all of caCert, cert and key (PEM) when any of them is set; set the missing ones or unset all three to let the chart generate a certificate" -}}
{{- end -}}
{{- if $userCert -}}
{{- if not (contains "BEGIN CERTIFICATE" $tls.caCert) -}}
{{- fail "webhook.tls.caCert is not a PEM certificate (no BEGIN CERTIFICATE line); pass the file with --set-file webhook.tls.caCert=ca.crt" -}}
{{- end -}}
{{- if not (contains "BEGIN CERTIFICATE" $tls.cert) -}}
{{- fail "webhook.tls.cert is not a PEM certificate (no BEGIN CERTIFICATE line); pass the file with --set-file webhook.tls.cert=tls.crt" -}}
{{- end -}}
{{- if not (contains "PRIVATE KEY" $tls.key) -}}
{{- fail "webhook.tls.key is not a PEM private key (no PRIVATE KEY line); pass the file with --set-file webhook.tls.key=tls.key" -}}
{{- end -}}
{{- end -}}

{{- if and $v.webhook.certManager.enabled (eq $v.webhook.certManager.issuerRef.kind "ClusterIssuer") (not $v.webhook.certManager.issuerRef.name) -}}
{{- fail "webhook.certManager.issuerRef.kind=ClusterIssuer needs webhook.certManager.issuerRef.name; name an existing ClusterIssuer, or use kind Issuer with an empty name to let the chart create one" -}}
{{- end -}}

{{- end }}
