#!/bin/sh
# azd postdeploy hook: subscribe the blob trigger `on_export` to BlobCreated events of the exports container.
#
# The blob trigger runs with source="EventGrid" (the only blob trigger the Flex Consumption plan has): Event Grid
# calls the app's blob extension webhook, authenticated by the app's `blobs_extension` system key. That key exists
# only once the deployed code has started, so this runs after `azd deploy`, not after provisioning.
# Safe to run again: `create` on an existing subscription updates it.
#
# Needs: az (logged in: `az login`), and azd unless the values below are already in the environment. Run by azd,
# or by hand from the repository root.
set -eu

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "postdeploy: '$1' is not installed; see docs/deploy.md (Prerequisites)" >&2
    exit 1
  fi
}
need az

# azd hands its environment values to hooks; load them when the script runs on its own.
if [ -z "${AZURE_FUNCTION_APP_NAME:-}" ]; then
  need azd
  echo "postdeploy: loading values from 'azd env get-values'"
  while IFS='=' read -r key value; do
    [ -n "$key" ] || continue
    value=$(printf '%s' "$value" | sed -e 's/^"//' -e 's/"$//')
    export "$key=$value"
  done <<EOF
$(azd env get-values)
EOF
fi

for name in AZURE_FUNCTION_APP_NAME AZURE_RESOURCE_GROUP EXPORTS_CONTAINER_NAME EXPORTS_SYSTEM_TOPIC_NAME; do
  eval "current=\${$name:-}"
  if [ -z "$current" ]; then
    echo "postdeploy: $name is not set: run 'azd provision' first" >&2
    exit 1
  fi
done

app="$AZURE_FUNCTION_APP_NAME"
group="$AZURE_RESOURCE_GROUP"
host="${AZURE_FUNCTION_APP_HOSTNAME:-$app.azurewebsites.net}"
function_name="on_export" # the Python function name of the blob trigger in function_app.py
subscription="${EXPORTS_EVENT_SUBSCRIPTION_NAME:-exports-blob-created}"
attempts="${BLOBS_KEY_ATTEMPTS:-18}"
pause="${BLOBS_KEY_RETRY_SECONDS:-10}"

# The host creates the key when it first starts with the blob trigger loaded; give a cold start time.
key=""
attempt=1
while [ "$attempt" -le "$attempts" ]; do
  key=$(az functionapp keys list --name "$app" --resource-group "$group" \
          --query "systemKeys.blobs_extension" --output tsv 2>/dev/null || true)
  [ -n "$key" ] && break
  echo "postdeploy: waiting for the blobs_extension key of $app ($attempt/$attempts)"
  sleep "$pause"
  attempt=$((attempt + 1))
done
if [ -z "$key" ]; then
  echo "postdeploy: no blobs_extension system key on $app. Check that the deployment succeeded and the app starts" >&2
  echo "  (Application Insights, or 'az functionapp function list -n $app -g $group' lists on_export), then" >&2
  echo "  run this script again: sh infra/hooks/postdeploy.sh" >&2
  exit 1
fi

# The key is part of the URL: it is never printed.
endpoint="https://$host/runtime/webhooks/blobs?functionName=Host.Functions.$function_name&code=$key"

echo "postdeploy: subscribing $function_name to BlobCreated in container '$EXPORTS_CONTAINER_NAME'"
az eventgrid system-topic event-subscription create \
  --name "$subscription" \
  --resource-group "$group" \
  --system-topic-name "$EXPORTS_SYSTEM_TOPIC_NAME" \
  --endpoint-type webhook \
  --endpoint "$endpoint" \
  --included-event-types Microsoft.Storage.BlobCreated \
  --subject-begins-with "/blobServices/default/containers/$EXPORTS_CONTAINER_NAME/blobs/" \
  --output none

echo "postdeploy: event subscription '$subscription' is in place on topic $EXPORTS_SYSTEM_TOPIC_NAME"
