#!/bin/sh
# azd postdeploy hook: subscribe the blob trigger `on_export` to BlobCreated events of the exports container.
#
# The blob trigger runs with source="EventGrid" (the only blob trigger the Flex Consumption plan has): Event Grid
# calls the app's blob extension webhook, authenticated by the app's `blobs_extension` system key. That key exists
# only once the deployed code has started, so this runs after `azd deploy`, not after provisioning.
#
# The subscription (docs/deploy.md, "The Event Grid subscription"): every BlobCreated event under the exports
# container, with no filter on the storage API, so PutBlob, PutBlockList, CopyBlob and, on ADLS Gen2, the empty
# CreateFile and then FlushWithClose all reach the app; retried for 24 hours (30 attempts), then dead-lettered into
# the dead-letter container with the system topic's own identity. It is written with `az rest` from a file only this
# user can read, so the key is never on a command line and never printed. Safe to run again: PUT updates it.
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


for name in AZURE_FUNCTION_APP_NAME AZURE_RESOURCE_GROUP EXPORTS_CONTAINER_NAME EXPORTS_SYSTEM_TOPIC_ID \
    AZURE_STORAGE_ACCOUNT_ID EVENTGRID_DEADLETTER_CONTAINER_NAME; do
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
api_version="2022-06-15"
max_delivery_attempts=30 # Event Grid retries with back-off ...
event_ttl_minutes=1440   # ... for at most 24 hours, then dead-letters the event

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
# Everything below goes into JSON unescaped: only the characters keys, host names and resource ids are made of.
for value in "$key" "$host" "$EXPORTS_CONTAINER_NAME" "$AZURE_STORAGE_ACCOUNT_ID" "$EVENTGRID_DEADLETTER_CONTAINER_NAME"; do
  case "$value" in
    *[!A-Za-z0-9_=/.+\(\)-]*)
      echo "postdeploy: a value read from azd or az holds a character it cannot have; nothing was changed" >&2
      exit 1 ;;
  esac
done

# The request body holds the key: a file only this user can read, removed on every way out.
umask 077
body_file=$(mktemp)
trap 'rm -f "$body_file"' EXIT
trap 'exit 1' INT TERM
cat >"$body_file" <<EOF
{"properties": {
  "destination": {"endpointType": "WebHook", "properties": {
    "endpointUrl": "https://$host/runtime/webhooks/blobs?functionName=Host.Functions.$function_name&code=$key",
    "maxEventsPerBatch": 1, "preferredBatchSizeInKilobytes": 64}},
  "filter": {"includedEventTypes": ["Microsoft.Storage.BlobCreated"],
             "subjectBeginsWith": "/blobServices/default/containers/$EXPORTS_CONTAINER_NAME/blobs/"},
  "eventDeliverySchema": "EventGridSchema",
  "retryPolicy": {"maxDeliveryAttempts": $max_delivery_attempts, "eventTimeToLiveInMinutes": $event_ttl_minutes},
  "deadLetterWithResourceIdentity": {"identity": {"type": "SystemAssigned"}, "deadLetterDestination": {
    "endpointType": "StorageBlob",
    "properties": {"resourceId": "$AZURE_STORAGE_ACCOUNT_ID", "blobContainerName": "$EVENTGRID_DEADLETTER_CONTAINER_NAME"}}}
}}
EOF

url="$EXPORTS_SYSTEM_TOPIC_ID/eventSubscriptions/$subscription?api-version=$api_version"
echo "postdeploy: subscribing $function_name to BlobCreated in container '$EXPORTS_CONTAINER_NAME'"
az rest --method put --url "$url" --body "@$body_file" --output none
rm -f "$body_file"

# Event Grid validates the webhook (the app answers its handshake) before the subscription is ready.
state=""
attempt=1
while [ "$attempt" -le "$attempts" ]; do
  state=$(az rest --method get --url "$url" --query "properties.provisioningState" --output tsv 2>/dev/null || true)
  case "$state" in
    Succeeded) break ;;
    Failed|Canceled)
      echo "postdeploy: Event Grid could not validate the webhook of $app (subscription $state). Check that the app" >&2
      echo "  is running, then run this script again: sh infra/hooks/postdeploy.sh" >&2
      exit 1 ;;
  esac
  echo "postdeploy: waiting for the event subscription (${state:-no answer}, $attempt/$attempts)"
  sleep "$pause"
  attempt=$((attempt + 1))
done
if [ "$state" != "Succeeded" ]; then
  echo "postdeploy: the event subscription '$subscription' is still '${state:-unknown}'; run this script again later" >&2
  exit 1
fi

echo "postdeploy: event subscription '$subscription' is in place: BlobCreated under '$EXPORTS_CONTAINER_NAME'," \
     "retried for $event_ttl_minutes minutes, then dead-lettered into '$EVENTGRID_DEADLETTER_CONTAINER_NAME'"
