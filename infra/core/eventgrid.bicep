// The Event Grid system topic of the storage account. The blob trigger (source="EventGrid") is fed by a webhook
// subscription on this topic; the subscription is created after deploy by infra/hooks/postdeploy.sh (or .ps1),
// because its URL carries the app's `blobs_extension` system key, which exists only once the deployed code has
// started. A storage account can have one system topic.

param name string
param location string = resourceGroup().location
param tags object = {}
param storageAccountId string

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: location
  tags: tags
  properties: {
    source: storageAccountId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output name string = systemTopic.name
