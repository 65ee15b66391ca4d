// The Event Grid system topic of the storage account. The blob trigger (source="EventGrid") is fed by a webhook
// subscription on this topic; the subscription is created after deploy by infra/hooks/postdeploy.sh (or .ps1),
// because its URL carries the app's `blobs_extension` system key, which exists only once the deployed code has
// started. A storage account can have one system topic.
//
// The topic has a system-assigned identity: the subscription dead-letters events it could not deliver into a blob
// container with it (deadLetterWithResourceIdentity), because the storage account takes no account keys.

param name string
param location string = resourceGroup().location
param tags object = {}
param storageAccountId string

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: storageAccountId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output name string = systemTopic.name
output id string = systemTopic.id
output principalId string = systemTopic.identity.principalId
